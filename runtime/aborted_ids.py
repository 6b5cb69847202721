"""The request ids a worker was told to abort, remembered for a while.

Calls to one actor may run in any order once they await (Ray async actors), and the
router may give up on a call before it even reaches the worker: an abort can arrive
*before* the reserve, prefill or generate it cancels. Without a memory of it, that late
call would take KV blocks for a request nobody waits for -- a leak. So every abort is
remembered, and a call for a remembered id is refused. Ids are per call and placement
attempt (the router's ``attempt_id`` carries a random key of the call's own, whatever
request id the client reuses), so a remembered id is never legitimately reused.
"""

from __future__ import annotations

from collections import OrderedDict

CAPACITY = 65536  # far more than the aborts that can be in flight at once


class AbortedIds:
    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()

    def add(self, request_id: str) -> None:
        self._ids[request_id] = None
        self._ids.move_to_end(request_id)
        while len(self._ids) > self.capacity:
            self._ids.popitem(last=False)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._ids
