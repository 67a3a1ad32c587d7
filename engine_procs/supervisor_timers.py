"""The supervisor's timers: decode timeouts, time budgets and `metrics` frames, kept in one
heap of each run's next check so that nothing scans every task. A mixin of
:class:`engine_procs.supervisor.Supervisor`."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections import deque
from typing import TYPE_CHECKING

from engine_procs.runs import Run
from ipc import protocol as p
from orchd.config import Config, Replica
from orchd.core.errors import Code, OrchdError

HOUSEKEEPING_S = 0.1  # while tasks run (decode timeouts are checked this often)
IDLE_HOUSEKEEPING_S = 1.0


def _now() -> float:
    return time.monotonic()


class Timers:
    # State the supervisor owns (declared here for the type checker).
    replica: Replica
    runs: dict[str, Run]
    checks: list[tuple[float, int, Run]]
    decode_timeout_s: float
    metrics_s: float
    queue_depth: int
    busy: asyncio.Event
    ended: dict[str, Run]
    ended_order: deque[Run]
    retention_s: float

    cfg: Config

    if TYPE_CHECKING:

        def send(self, msg: p.Message) -> None: ...
        def _end(self, run: Run, reason: str) -> None: ...
        def _fail(self, run: Run, err: OrchdError) -> None: ...
        def _emit(self, run: Run, f: bytes) -> None: ...

    def _itl_ms(self) -> float:
        """Recent per-token time across (a sample of) running tasks, for on-time estimates."""
        spans = [
            (r.t_last - r.t_first) * 1000.0 / (r.tokens - 1)
            for r in itertools.islice(self.runs.values(), 64)
            if r.tokens > 1
        ]
        return sum(spans) / len(spans) if spans else 0.0

    def _deadlines(self, run: Run) -> tuple[float, float, float]:
        """(decode timeout, time budget, next `metrics` frame) of a run, inf when none."""
        inf = float("inf")
        timeout_at = (run.t_last or run.t_start) + self.decode_timeout_s
        budget_at = inf
        if run.time_budget_ms is not None:
            budget_at = run.t_start + run.time_budget_ms / 1000.0
        metrics_at = inf
        if self.metrics_s > 0 and run.frontend >= 0:
            metrics_at = run.t_metrics + self.metrics_s
        return timeout_at, budget_at, metrics_at

    def _schedule_check(self, run: Run, now: float) -> None:
        """Queue the run's next timer: decode timeout, time budget or `metrics` frame."""
        run.check_at = max(min(self._deadlines(run)), now + 0.001)
        heapq.heappush(self.checks, (run.check_at, run.rid, run))

    def _check(self, run: Run, now: float, itl: list[float]) -> None:
        timeout_at, budget_at, metrics_at = self._deadlines(run)
        if now >= budget_at:
            run.adapter.abort(run.rid)
            self._end(run, "budget")
            return
        if now >= timeout_at:
            err = OrchdError(
                Code.DECODE_TIMEOUT,
                f"no token for {self.replica.decode_timeout_ms} ms",
                engine=self.replica.engine,
                pool_id=self.replica.pool_id,
            )
            self._fail(run, err)
            return
        if now >= metrics_at:
            if not itl:
                itl.append(self._itl_ms())
            run.t_metrics = now
            self._emit(run, run.metrics_frame(now, self.queue_depth, itl[0]))
        self._schedule_check(run, now)

    async def housekeeping(self) -> None:
        """Timers without scanning every task: a heap of each run's next check."""
        hb = self.cfg.server.heartbeat_ms / 1000.0
        next_hb = 0.0
        while True:
            if self.runs:
                await asyncio.sleep(HOUSEKEEPING_S)
            else:
                # Idle: sleep long, but wake as soon as a task arrives.
                self.busy.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.busy.wait(), IDLE_HOUSEKEEPING_S)
            now = _now()
            if now >= next_hb:
                self.send(p.Heartbeat())
                next_hb = now + hb
            checks = self.checks
            itl: list[float] = []
            while checks and checks[0][0] <= now:
                at, _, run = heapq.heappop(checks)
                if not run.ended and at == run.check_at:  # else: a stale entry
                    self._check(run, now, itl)
            while self.ended_order and now - self.ended_order[0].ended_at > self.retention_s:
                run = self.ended_order.popleft()
                self.ended.pop(run.task_id, None)
