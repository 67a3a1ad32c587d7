"""Per-run figures with `vllm bench serve`'s definitions and result-file keys (perf/README.md).

A run hands over the measured cohort (requests *sent* inside the measurement window) as
:class:`Req` records plus the chunk gaps of those requests, and window counters (tokens,
chunks and completions that fell *inside* the window). :func:`summarize` turns them into one
flat dict: vLLM's keys first, orchd's extras after.
"""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PERCENTILES = (50, 90, 99)
DEFAULT_SLO = {"ttft": 1000.0, "tpot": 50.0}  # ms; a request is "good" if it meets every one


@dataclass(slots=True)
class Req:
    send_ns: int  # request written (POST /v1/tasks, or the GET for the ceiling)
    first_ns: int  # the read that carried the first token (0: none)
    end_ns: int  # the response ended (terminal frame and end of body)
    tokens: int  # token events received
    chunks: int  # reads that carried >= 1 token event
    ok: bool
    admit_ns: int = 0  # the 202 arrived (orchd only; 0: no separate admission)


@dataclass
class Window:
    """Counters over the measurement window, and the cohort sent inside it."""

    duration_s: float
    reqs: list[Req] = field(default_factory=list)
    gaps_us: array = field(default_factory=lambda: array("q"))  # chunk gaps of the cohort
    stamps_us: array = field(default_factory=lambda: array("q"))  # engine emit -> receipt
    tokens: int = 0  # token events received inside the window (any request)
    chunks: int = 0  # reads carrying tokens inside the window
    completed: int = 0  # requests that ended OK inside the window
    rejected: int = 0  # 429 / 503 answers to requests sent inside the window
    failed: int = 0  # other failures of requests sent inside the window
    buckets: list[int] = field(default_factory=list)  # tokens per whole second of the window
    input_tokens_per_req: int = 0
    connections: int = 0  # TCP connections the client opened (keep-alive reuses them)
    errors: dict[str, int] = field(default_factory=dict)  # why cohort requests failed

    def fail(self, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1

    def merge(self, o: Window) -> None:
        self.connections += o.connections
        for k, v in o.errors.items():
            self.errors[k] = self.errors.get(k, 0) + v
        self.reqs += o.reqs
        self.gaps_us += o.gaps_us
        self.stamps_us += o.stamps_us
        self.tokens += o.tokens
        self.chunks += o.chunks
        self.completed += o.completed
        self.rejected += o.rejected
        self.failed += o.failed
        if len(o.buckets) > len(self.buckets):
            self.buckets += [0] * (len(o.buckets) - len(self.buckets))
        for i, b in enumerate(o.buckets):
            self.buckets[i] += b


def parse_slo(pairs: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` (ms), as `vllm bench serve --goodput` takes them."""
    if not pairs:
        return dict(DEFAULT_SLO)
    out = {}
    for p in pairs:
        k, _, v = p.partition(":")
        if k not in ("ttft", "tpot", "e2el") or not v:
            raise ValueError(f"--goodput wants ttft|tpot|e2el:MS pairs, got {p!r}")
        out[k] = float(v)
    return out


def _stats(out: dict[str, Any], name: str, values_ms: np.ndarray) -> None:
    if values_ms.size == 0:
        values_ms = np.zeros(1)
    out[f"mean_{name}_ms"] = float(np.mean(values_ms))
    out[f"median_{name}_ms"] = float(np.median(values_ms))
    out[f"std_{name}_ms"] = float(np.std(values_ms))
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(values_ms, p))


def _peak_concurrency(reqs: list[Req]) -> int:
    ev = sorted([(r.send_ns, 1) for r in reqs] + [(r.end_ns, -1) for r in reqs])
    cur = peak = 0
    for _, d in ev:
        cur += d
        peak = max(peak, cur)
    return peak


def summarize(w: Window, slo: dict[str, float]) -> dict[str, Any]:
    ok = [r for r in w.reqs if r.ok and r.first_ns]
    dur = w.duration_s
    ttft = np.array([(r.first_ns - r.send_ns) / 1e6 for r in ok])
    e2el = np.array([(r.end_ns - r.send_ns) / 1e6 for r in ok])
    tpots = [((r.end_ns - r.first_ns) / 1e6 / (r.tokens - 1)) if r.tokens > 1 else 0.0 for r in ok]
    tpot = np.array([t for t, r in zip(tpots, ok, strict=True) if r.tokens > 1])
    # Per token: each chunk gap once, and a zero for every further token in the same read.
    zeros = sum(r.tokens - r.chunks for r in ok)
    gaps_ms = np.frombuffer(w.gaps_us, dtype=np.int64).astype(np.float64) / 1000.0
    itl = np.concatenate([gaps_ms, np.zeros(zeros)])
    good = 0
    for tp, tt, ee in zip(tpots, ttft, e2el, strict=True):
        if (
            tt <= slo.get("ttft", math.inf)
            and tp <= slo.get("tpot", math.inf)
            and ee <= slo.get("e2el", math.inf)
        ):
            good += 1
    total_out = sum(r.tokens for r in ok)
    total_in = w.input_tokens_per_req * len(ok)
    out: dict[str, Any] = {
        "num_prompts": len(w.reqs) + w.failed + w.rejected,  # the cohort: requests sent in it
        "duration": dur,
        "completed": len(ok),
        "failed": sum(1 for r in w.reqs if not (r.ok and r.first_ns)) + w.failed,
        "total_input_tokens": total_in,
        "total_output_tokens": total_out,
        "request_throughput": w.completed / dur if dur else 0.0,
        "request_goodput": good / dur if dur else 0.0,
        "output_throughput": w.tokens / dur if dur else 0.0,
        "total_token_throughput": (w.tokens + w.input_tokens_per_req * w.completed) / dur
        if dur
        else 0.0,
        "max_output_tokens_per_s": float(max(w.buckets)) if w.buckets else 0.0,
        "max_concurrent_requests": _peak_concurrency(ok),
    }
    _stats(out, "ttft", ttft)
    _stats(out, "tpot", tpot)
    _stats(out, "itl", itl)
    _stats(out, "e2el", e2el)
    # ---- orchd extras
    out["rejected"] = w.rejected
    out["token_events_per_s"] = w.tokens / dur if dur else 0.0
    out["chunks_per_s"] = w.chunks / dur if dur else 0.0
    out["tokens_per_chunk"] = w.tokens / w.chunks if w.chunks else 0.0
    out["goodput_slo_ms"] = slo
    out["connections_opened"] = w.connections
    out["errors"] = w.errors
    _stats(out, "itl_chunk", gaps_ms)
    admit = np.array([(r.admit_ns - r.send_ns) / 1e6 for r in ok if r.admit_ns])
    if admit.size:
        _stats(out, "admit", admit)
    if len(w.stamps_us):
        st = np.frombuffer(w.stamps_us, dtype=np.int64).astype(np.float64) / 1000.0
        _stats(out, "engine_to_client", st)
    return out
