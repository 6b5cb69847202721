"""Summaries of a run: latency percentiles, throughput, SLO attainment and goodput.

Definitions (DistServe's for the latencies and attainment, so numbers compare):
- TTFT: send -> first token. TPOT: a request's mean gap after its first token.
  ITL: every gap between consecutive tokens, pooled over requests. E2E: send -> end.
- SLO attainment: the fraction of requests (errors count as misses) that meet both
  their TTFT and their TPOT SLO.
- goodput (of a sweep, ``goodput``): the *first crossing* of the target (90%) going up
  the sweep, not the highest passing rate. From the lowest rate up, at the first sweep
  point whose attainment is below the target, the rate where the straight line between
  it and the point before (which was at or above the target) meets the target; the
  highest swept rate if no point falls below; 0 if the lowest rate is already below.
  Points back at or above the target after the first crossing are not credited.
  ``goodput_rps`` of a single run is the simpler "requests/s that met the SLO" (over
  the run's wall time).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise

from bench.loadgen import RequestRecord

PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Slo:
    """Per request class: TTFT <= ttft_s + ttft_per_token_s * prompt tokens (a long
    prompt is allowed its prefill), and TPOT <= tpot_s."""

    ttft_s: float
    tpot_s: float
    ttft_per_token_s: float = 0.0

    def ttft_limit(self, prompt_tokens: int) -> float:
        return self.ttft_s + self.ttft_per_token_s * prompt_tokens

    def met(self, r: RequestRecord) -> bool:
        if not r.ok or r.ttft_s is None:
            return False
        if r.ttft_s > self.ttft_limit(r.prompt_tokens):
            return False
        return r.tpot_s is None or r.tpot_s <= self.tpot_s


def percentile(xs: Sequence[float], p: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None when empty."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * p / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist(xs: Sequence[float]) -> dict[str, float | None]:
    out: dict[str, float | None] = {f"p{p}": percentile(xs, p) for p in PERCENTILES}
    out["mean"] = sum(xs) / len(xs) if xs else None
    out["n"] = len(xs)
    return out


def summarize(records: Sequence[RequestRecord], wall_s: float,
              slos: dict[str, Slo], kinds: Sequence[str] | None = None) -> dict[str, object]:
    """Summary of the records whose kind is in ``kinds`` (all when None)."""
    rs = [r for r in records if kinds is None or r.kind in kinds]
    ok = [r for r in rs if r.ok]
    codes: dict[str, int] = {}
    for r in rs:
        codes[r.code] = codes.get(r.code, 0) + 1
    met = sum(slos[r.kind].met(r) for r in rs if r.kind in slos)
    judged = sum(r.kind in slos for r in rs)
    tokens = sum(r.completion_tokens for r in ok)
    return {
        "requests": len(rs),
        "codes": codes,
        "ttft_s": dist([r.ttft_s for r in ok if r.ttft_s is not None]),
        "tpot_s": dist([r.tpot_s for r in ok if r.tpot_s is not None]),
        "itl_s": dist([g for r in ok for g in r.gaps_s]),
        "e2e_s": dist([r.e2e_s for r in ok if r.e2e_s is not None]),
        "prompt_tokens": dist([float(r.prompt_tokens) for r in ok]),
        "cached_tokens": dist([float(r.cached_tokens) for r in ok]),
        "throughput": {
            "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
            "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
            "wall_s": wall_s,
        },
        "slo_attainment": met / judged if judged else None,
        "goodput_rps": met / wall_s if wall_s else 0.0,
    }


def goodput(points: Sequence[tuple[float, float]], target: float = 0.9) -> float:
    """The first crossing below ``target`` of (rate, attainment) points, in rate order.

    Walking up from the lowest rate: if the lowest rate's attainment is already below
    the target, 0 (the sweep does not reach low enough to say more); at the first pair
    (r0, a0 >= target), (r1, a1 < target), the linear interpolation
    r0 + (r1 - r0) * (a0 - target) / (a0 - a1) (r0 itself when a0 == target); if no
    point is below the target, the highest rate (0 for no points). Anything after the
    first crossing is ignored: this is not "the highest rate at or above the target"
    when attainment dips below it and comes back (e.g. 83%, 91%, 94% gives 0)."""
    pts = sorted(points)
    best = 0.0
    for (r0, a0), (r1, a1) in pairwise(pts):
        if a0 < target:
            return best
        best = r0
        if a1 < target:
            return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)
    if pts and pts[-1][1] >= target:
        best = pts[-1][0]
    return best


def slos_json(slos: dict[str, Slo]) -> dict[str, dict[str, float]]:
    return {k: asdict(v) for k, v in slos.items()}


def records_json(records: Sequence[RequestRecord]) -> list[dict[str, object]]:
    """Per request, compactly (times rounded to 0.1 ms) for plots and re-analysis."""
    out = []
    for r in records:
        d = asdict(r)
        d["token_times_s"] = [round(t, 4) for t in r.token_times_s]
        out.append(d)
    return out
