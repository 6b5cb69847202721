"""PNG plots from the suite's JSON (so they can be redrawn without rerunning):

    latency-cdf.png      TTFT, TPOT and ITL CDFs of the stream requests, per deployment,
                         interference at the reference rate (+ shared-prefix TTFT on/off)
    slo-vs-rate.png      SLO attainment against the stream rate, per deployment
    tpot-timeline.png    every inter-token gap of the stream requests over time, per
                         deployment, with the prefill bursts shaded
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt

COLORS = {"disaggregated": "tab:blue", "colocated": "tab:red",
          "disaggregated-noprefix": "tab:gray"}
DPI = 80  # keeps each PNG well under 200 KB


def _runs(records: dict[str, Any], workload: str, rate: float | None = None
          ) -> list[dict[str, Any]]:
    return [r for r in records["runs"] if r["workload"] == workload
            and (rate is None or abs(r["rate"] - rate) < 1e-9)]


def _cdf(ax: Any, xs: list[float], label: str, color: str) -> None:
    if not xs:
        return
    s = sorted(xs)
    ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=label, color=color)


def _streams(run: dict[str, Any]) -> list[dict[str, Any]]:
    return [q for q in run["records"] if q["kind"] == "stream" and q["code"] == "OK"]


def _gaps(q: dict[str, Any]) -> list[float]:
    t = q["token_times_s"]
    return [b - a for a, b in pairwise(t)]


def latency_cdf(records: dict[str, Any], ref_rate: float, out: Path) -> None:
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for run in _runs(records, "interference", ref_rate):
        dep, qs = run["deployment"], _streams(run)
        c = COLORS.get(dep, "k")
        _cdf(axes[0], [q["first_token_s"] - q["sent_s"] for q in qs], dep, c)
        tpots = [(q["token_times_s"][-1] - q["token_times_s"][0])
                 / (len(q["token_times_s"]) - 1) for q in qs if len(q["token_times_s"]) > 1]
        _cdf(axes[1], tpots, dep, c)
        _cdf(axes[2], [g for q in qs for g in _gaps(q)], dep, c)
    for run in _runs(records, "shared-prefix"):
        dep = run["deployment"]
        label = "prefix cache off" if dep.endswith("noprefix") else "prefix cache on"
        _cdf(axes[3], [q["first_token_s"] - q["sent_s"] for q in run["records"]
                       if q["code"] == "OK"], label, COLORS.get(dep, "k"))
    titles = (f"stream TTFT (interference, {ref_rate:g} req/s)", "stream TPOT",
              "stream ITL (every gap)", "shared-prefix TTFT (disaggregated)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("seconds")
        ax.set_xscale("log")
        ax.set_xlim(left=1e-2)  # ~0 gaps are tokens delivered in one message
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    axes[0].set_ylabel("fraction of requests / gaps")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def slo_vs_rate(summary: dict[str, Any], out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    head = summary["headline"]
    for dep in ("disaggregated", "colocated"):
        h = head.get(dep) or {}
        for ax, key in zip(axes, ("attainment_vs_rate", "stream_attainment_vs_rate"),
                           strict=True):
            pts = [(r, a) for r, a in h.get(key, []) if a is not None]
            g = h.get("goodput_rps" if key == "attainment_vs_rate" else "stream_goodput_rps")
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", color=COLORS[dep],
                        label=f"{dep} (goodput {g or 0:.2f} req/s)")
    t = summary["attainment_target"]
    for ax, title in zip(axes, ("all requests (streams + bursts)", "stream requests only"),
                         strict=True):
        ax.axhline(t, color="k", ls="--", lw=0.8)
        ax.set_title(f"SLO attainment, interference: {title}", fontsize=9)
        ax.set_xlabel("stream arrival rate (req/s)")
        ax.set_ylim(0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("fraction meeting TTFT and TPOT SLO")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def tpot_timeline(records: dict[str, Any], ref_rate: float, out: Path) -> None:
    runs = _runs(records, "interference", ref_rate)
    fig, axes = plt.subplots(len(runs) or 1, 1, figsize=(10, 2.6 * max(len(runs), 1)),
                             sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], runs, strict=False):
        for q in run["records"]:
            if q["kind"] != "burst" or q["first_token_s"] is None:
                continue
            # Shade each burst request from its arrival to its first token: its prefill.
            ax.axvspan(q["sent_s"], q["first_token_s"], color="orange", alpha=0.15, lw=0)
        xs, ys = [], []
        for q in _streams(run):
            t = q["token_times_s"]
            xs += t[1:]
            ys += [1e3 * g for g in _gaps(q)]
        ax.scatter(xs, ys, s=2, color=COLORS.get(run["deployment"], "k"))
        ax.set_yscale("log")
        # Tokens that arrive in one message get ~0 gaps; they say nothing about TPOT.
        ax.set_ylim(bottom=10)
        ax.set_ylabel("gap (ms)")
        ax.set_title(f"{run['deployment']}: stream inter-token gaps, {ref_rate:g} req/s; "
                     "orange = a burst prompt's prefill (arrival to first token)", fontsize=9)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("seconds since start")
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def draw_all(summary: dict[str, Any], records: dict[str, Any], out_dir: Path,
             prefix: str = "serving-cpu") -> list[Path]:
    ref = summary["config"]["ref_rate"]
    paths = [out_dir / f"{prefix}-latency-cdf.png", out_dir / f"{prefix}-slo-vs-rate.png",
             out_dir / f"{prefix}-tpot-timeline.png"]
    latency_cdf(records, ref, paths[0])
    slo_vs_rate(summary, paths[1])
    tpot_timeline(records, ref, paths[2])
    return paths
