"""Liveness in the scheduler core: a queued task whose deadline passed ends (DEADLINE_UNMET)
instead of waiting for nothing, and a supervisor taken back after it was taken as dead has the
tasks failed then aborted. A mixin of :class:`orchd.core.scheduler.SchedulerCore`; peer
liveness itself is :mod:`orchd.core.liveness`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipc import protocol as p
from orchd.core.errors import Code
from orchd.core.queue import AdmissionQueue
from orchd.core.tasks import Out, Stats, Task, sup


class LivenessOps:
    # State the core owns (declared here for the type checker).
    tasks: dict[str, Task]
    stats: Stats
    queue: AdmissionQueue[None]
    _orphans: dict[str, list[str]]

    if TYPE_CHECKING:

        def fail_task(self, t: Task, err: p.ErrorInfo, now: float, out: Out) -> None: ...

    def rejoined(self, replica_id: str, now: float, *, same_process: bool = True) -> Out:
        """The supervisor of ``replica_id``, taken as dead, is heard again: the same process
        has what it still runs of the tasks failed then aborted, so their slots come free
        (a new process runs none of them)."""
        orphans = self._orphans.pop(replica_id, [])
        if not same_process:
            return []
        return [(sup(replica_id), p.Abort(0, tid, "worker_reset")) for tid in orphans]

    def expire_queued(self, now: float) -> Out:
        """A queued task whose ``deadline_ms`` (from its admission) has passed cannot meet it:
        it ends with DEADLINE_UNMET and leaves the queue."""
        out: Out = []
        for tid in list(self.queue):
            t = self.tasks[tid]
            waited = now - t.enqueued_ms
            if waited < t.spec.deadline_ms:
                continue
            err = p.ErrorInfo(
                Code.DEADLINE_UNMET.value,
                f"deadline_ms: {t.spec.deadline_ms} ms passed while the task waited in the "
                f"queue (no replica of pool {', '.join(t.pools)} took it)",
                engine=t.spec.engine or None,
                pool_id=t.pools[0] if t.pools else None,
            )
            self.stats.bump(self.stats.rejected, (t.spec.engine, Code.DEADLINE_UNMET.value))
            self.fail_task(t, err, now, out)
        return out
