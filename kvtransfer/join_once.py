"""One set-up per peer at a time, shared by the senders that build a communicator on
first use (kvtransfer.nccl, kvtransfer.collective): the first caller for a peer builds
it, callers that arrive meanwhile wait for that result (bounded), never build twice."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from typing import TypeVar

from messages.transfer import KVTransferTimeout

T = TypeVar("T")


def join_once(lock: threading.Lock, joining: dict[str, concurrent.futures.Future[T]],
              key: str, known: Callable[[], T | None], join: Callable[[], T],
              timeout_s: float, what: str) -> T:
    """``known()`` (read under ``lock``) if set, else the one ``join()`` for ``key``;
    a waiter gives up with KVTransferTimeout after ``timeout_s``."""
    with lock:
        found = known()
        if found is not None:
            return found
        fut = joining.get(key)
        mine = fut is None
        if fut is None:
            fut = joining[key] = concurrent.futures.Future()
    if not mine:
        try:
            return fut.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise KVTransferTimeout(f"{what} set-up with {key} did not finish within "
                                    f"{timeout_s}s") from None
    try:
        value = join()
        fut.set_result(value)
        return value
    except BaseException as e:
        fut.set_exception(e)
        raise
    finally:
        with lock:
            joining.pop(key, None)
