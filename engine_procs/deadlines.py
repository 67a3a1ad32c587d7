"""Each run's next check in one heap, so that no timer scans every task: a run has at most
one live entry (``Run.check_at``); a later or earlier reschedule leaves stale entries behind,
which are skipped when they come up."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from engine_procs.runs import Run

MIN_WAIT_S = 0.001  # a check is never set closer than this (no busy loop on a timer)


class DeadlineHeap:
    def __init__(self) -> None:
        self.heap: list[tuple[float, int, Run]] = []  # (when, rid, run)

    def schedule(self, run: Run, at: float, now: float) -> None:
        """Check ``run`` at ``at`` (or a moment from now), unless its live check comes first:
        that one reschedules when it runs."""
        at = max(at, now + MIN_WAIT_S)
        if now < run.check_at <= at:
            return
        run.check_at = at
        heapq.heappush(self.heap, (at, run.rid, run))

    def next_at(self) -> float | None:
        return self.heap[0][0] if self.heap else None

    def due(self, now: float) -> Iterator[Run]:
        """The runs whose live check is due, each taken off the heap."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            at, _, run = heapq.heappop(heap)
            if not run.ended and at == run.check_at:  # else: a stale entry
                run.check_at = 0.0
                yield run
