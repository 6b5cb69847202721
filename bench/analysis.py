"""Why a number is what it is: the stream requests of an interference run split by
whether a burst prompt was being prefilled at the time.

A gap (or a stream's arrival) is "in a burst" when it falls between a burst request's
arrival and its first token, i.e. while the burst prompts were being prefilled. The
server's own Timing (queue vs prefill time) says where a stream's TTFT went.
"""

from __future__ import annotations

from collections.abc import Sequence

from bench.loadgen import RequestRecord
from bench.report import dist


def burst_windows(records: Sequence[RequestRecord]) -> list[tuple[float, float]]:
    return [(r.sent_s, r.first_token_s) for r in records
            if r.kind == "burst" and r.first_token_s is not None]


def _inside(t: float, windows: list[tuple[float, float]]) -> bool:
    return any(a <= t <= b for a, b in windows)


def split_by_bursts(records: Sequence[RequestRecord]) -> dict[str, object]:
    windows = burst_windows(records)
    streams = [r for r in records if r.kind == "stream" and r.ok]
    gaps_in, gaps_out = [], []
    for r in streams:
        for t, g in zip(r.token_times_s[1:], r.gaps_s, strict=True):
            (gaps_in if _inside(t, windows) else gaps_out).append(g)
    arrive_in = [r for r in streams if _inside(r.sent_s, windows)]
    arrive_out = [r for r in streams if not _inside(r.sent_s, windows)]

    def ttft_parts(rs: list[RequestRecord]) -> dict[str, object]:
        return {"ttft_s": dist([r.ttft_s for r in rs if r.ttft_s is not None]),
                "server_queue_s": dist([r.server_queue_s for r in rs
                                        if r.server_queue_s is not None]),
                "server_prefill_s": dist([r.server_prefill_s for r in rs
                                          if r.server_prefill_s is not None])}

    busy = sum(b - a for a, b in windows)
    return {"burst_windows_s": [(round(a, 2), round(b, 2)) for a, b in windows],
            "itl_in_bursts_s": dist(gaps_in), "itl_outside_bursts_s": dist(gaps_out),
            "streams_arriving_in_bursts": ttft_parts(arrive_in),
            "streams_arriving_outside_bursts": ttft_parts(arrive_out),
            "burst_prefill_seconds_total": busy}
