"""What the operator page shows that the scheduler's counters do not: the outcomes and timings
of the last tasks, each replica's token rate and TTFT percentiles over a recent window, and a
few minutes of every GPU's readings.

Sans-IO and bounded: the core feeds :meth:`Recent.ended` as each task ends, the scheduler shell
feeds :meth:`GpuHistory.observe` with NVML samples; time (ms) is always passed in. Every bound
is a constant below.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any

from orchd.core.tasks import Task

RECENT_TASKS = 100  # task outcomes kept, newest first in the view
RATE_WINDOW_MS = 10_000  # a replica's tokens/s is measured over this window
RATE_BUCKET_MS = 1_000  # ... in buckets of this width
TTFT_WINDOW_MS = 60_000  # TTFT percentiles are over tasks that ended within this window
TTFT_SAMPLES = 1_024  # ... at most this many per replica (the newest)
GPU_SAMPLE_MS = 1_000  # at most one GPU reading kept per this interval
GPU_HISTORY = 180  # readings kept per GPU: 3 minutes at GPU_SAMPLE_MS
GPU_FIELDS = ("utilization", "vram_used", "power_w", "temperature_c")


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one task ended, with its timings (ms; None where the task never got that far)."""

    task_id: str  # as orchd holds it: "<key id>/<the client's id>"
    api_key_id: str
    pool_id: str
    replica_id: str
    model_ref: str
    priority: str
    reason: str  # stop | length | canceled | error | budget | ...
    error_code: str
    tokens_out: int
    queue_ms: float  # admission to dispatch, or to its end if it never ran
    ttft_ms: float | None  # dispatch to first token
    total_ms: float  # admission to end
    ended_ms: float  # core time

    def view(self, wall_offset_ms: float) -> dict[str, Any]:
        gen_ms = self.total_ms - self.queue_ms - (self.ttft_ms or 0.0)
        return {
            "task_id": self.task_id,
            "api_key_id": self.api_key_id,
            "pool_id": self.pool_id,
            "replica_id": self.replica_id,
            "model_ref": self.model_ref,
            "priority": self.priority,
            "outcome": self.reason,
            "error_code": self.error_code,
            "tokens_out": self.tokens_out,
            "queue_ms": round(self.queue_ms, 1),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 1),
            "total_ms": round(self.total_ms, 1),
            "tokens_per_s": (
                round(self.tokens_out * 1000.0 / gen_ms, 1)
                if self.tokens_out > 1 and gen_ms > 0
                else None
            ),
            "ended_at_ms": int(self.ended_ms + wall_offset_ms),
        }


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil(n * q / 100), at least 1
    return ordered[int(rank) - 1]


class ReplicaWindow:
    """One replica's recently ended tasks: tokens spread over the time they were generated
    (buckets of ``RATE_BUCKET_MS``), and first-token times."""

    def __init__(self) -> None:
        self.buckets: dict[int, float] = {}  # bucket index -> tokens generated in it
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=TTFT_SAMPLES)  # (ended, ttft)

    def add(self, start_ms: float, end_ms: float, tokens: int, ttft_ms: float | None) -> None:
        """A task made ``tokens`` between ``start_ms`` (its first token) and ``end_ms``."""
        if ttft_ms is not None:
            self.ttfts.append((end_ms, ttft_ms))
        if tokens <= 0:
            return
        start_ms = max(start_ms, end_ms - RATE_WINDOW_MS)  # what came before counts for nothing
        span = end_ms - start_ms
        if span <= 0:
            b = int(end_ms // RATE_BUCKET_MS)
            self.buckets[b] = self.buckets.get(b, 0.0) + tokens
            return
        first, last = int(start_ms // RATE_BUCKET_MS), int(end_ms // RATE_BUCKET_MS)
        for b in range(first, last + 1):
            lo = max(start_ms, b * RATE_BUCKET_MS)
            hi = min(end_ms, (b + 1) * RATE_BUCKET_MS)
            if hi > lo:
                self.buckets[b] = self.buckets.get(b, 0.0) + tokens * (hi - lo) / span

    def _prune(self, now: float) -> None:
        oldest = int((now - RATE_WINDOW_MS) // RATE_BUCKET_MS)
        for b in [b for b in self.buckets if b < oldest]:
            del self.buckets[b]
        while self.ttfts and self.ttfts[0][0] < now - TTFT_WINDOW_MS:
            self.ttfts.popleft()

    def tokens_per_s(self, now: float) -> float:
        """Tokens per second over the last ``RATE_WINDOW_MS`` (the whole buckets within it and
        the current one), counting tasks that ended: a task still running counts once done."""
        self._prune(now)
        first = int((now - RATE_WINDOW_MS) // RATE_BUCKET_MS) + 1
        covered = now - first * RATE_BUCKET_MS
        if covered <= 0:
            return 0.0
        tokens = sum(v for b, v in self.buckets.items() if b >= first)
        return tokens * 1000.0 / covered

    def ttft_ms(self, now: float) -> tuple[float | None, float | None]:
        """TTFT p50 and p99 (ms) of the tasks that ended in the last ``TTFT_WINDOW_MS``."""
        self._prune(now)
        values = [v for _, v in self.ttfts]
        if not values:
            return None, None
        return percentile(values, 50), percentile(values, 99)


class GpuHistory:
    """The latest reading of every GPU and its last ``GPU_HISTORY`` readings (one per
    ``GPU_SAMPLE_MS`` at most), for the page's sparklines."""

    def __init__(self) -> None:
        self.latest: list[dict[str, Any]] = []
        self.series: dict[int, deque[tuple[Any, ...]]] = {}
        self.sampled_ms = float("-inf")

    def observe(self, now: float, rows: list[dict[str, Any]]) -> None:
        """A reading of every GPU: dicts with ``index`` and the ``GPU_FIELDS`` (None where the
        device cannot tell), plus anything else to show (name, uuid, vram_total, owners)."""
        self.latest = rows
        if now - self.sampled_ms < GPU_SAMPLE_MS:
            return
        self.sampled_ms = now
        for row in rows:
            series = self.series.setdefault(int(row["index"]), deque(maxlen=GPU_HISTORY))
            series.append(tuple(row.get(f) for f in GPU_FIELDS))

    def view(self, history: bool) -> list[dict[str, Any]]:
        out = []
        for row in self.latest:
            item = dict(row)
            if history:
                series = self.series.get(int(row["index"]), deque())
                item["history"] = {f: [s[i] for s in series] for i, f in enumerate(GPU_FIELDS)}
            out.append(item)
        return out


class Recent:
    def __init__(self, replica_pools: dict[str, str]) -> None:
        self.replica_pools = replica_pools  # replica id -> its pool
        self.tasks: deque[Outcome] = deque(maxlen=RECENT_TASKS)
        self.replicas: dict[str, ReplicaWindow] = {r: ReplicaWindow() for r in replica_pools}
        self.gpus = GpuHistory()

    def ended(
        self, t: Task, ran: bool, now: float, tokens_out: int = 0, first_token_ms: float = 0.0
    ) -> None:
        """Task ``t`` has just ended (its reason and error set); ``ran``: it was dispatched."""
        ttft = first_token_ms if ran and first_token_ms > 0 else None
        queue_ms = (t.started_ms if ran else now) - t.enqueued_ms
        pool = self.replica_pools.get(t.replica, "") if ran else (t.pools[0] if t.pools else "")
        self.tasks.append(
            Outcome(
                task_id=t.spec.task_id,
                api_key_id=t.spec.api_key_id,
                pool_id=pool,
                replica_id=t.replica if ran else "",
                model_ref=t.model_ref or t.spec.model_ref,
                priority=t.spec.priority,
                reason=t.end_reason,
                error_code=t.error.code if t.error is not None else "",
                tokens_out=tokens_out,
                queue_ms=max(0.0, queue_ms),
                ttft_ms=ttft,
                total_ms=max(0.0, now - t.enqueued_ms),
                ended_ms=now,
            )
        )
        window = self.replicas.get(t.replica) if ran else None
        if window is not None:
            window.add(t.started_ms + (ttft or 0.0), now, tokens_out, ttft)

    def view(self, wall_offset_ms: float) -> list[dict[str, Any]]:
        """The recent outcomes, newest first."""
        return [o.view(wall_offset_ms) for o in reversed(self.tasks)]
