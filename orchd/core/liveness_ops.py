"""Liveness in the scheduler core: replicas' reports and peers lost; a queued task whose
deadline passed ends (DEADLINE_UNMET) instead of waiting for nothing; a supervisor taken back
after it was taken as dead has the tasks failed then aborted. A mixin of
:class:`orchd.core.scheduler.SchedulerCore`; peer liveness itself is :mod:`orchd.core.liveness`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipc import protocol as p
from ipc.peers import Peer
from orchd.core.errors import Code
from orchd.core.placement import ReplicaView
from orchd.core.pools import Pools
from orchd.core.queue import AdmissionQueue
from orchd.core.series import Series
from orchd.core.tasks import Out, State, Stats, Task, sup


class LivenessOps:
    # State the core owns (declared here for the type checker).
    tasks: dict[str, Task]
    stats: Stats
    queue: AdmissionQueue[None]
    _orphans: dict[str, list[str]]
    _aborts: dict[int, str]
    replicas: dict[str, ReplicaView]
    pools: Pools
    series: Series

    if TYPE_CHECKING:

        def fail_task(self, t: Task, err: p.ErrorInfo, now: float, out: Out) -> None: ...
        def dispatch(self, now: float) -> Out: ...
        def frontend_lost(self, index: int, now: float) -> Out: ...

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

    # ------------------------------------------------------------------ replicas and peers

    def replica_status(self, peer: str, msg: p.ReplicaStatus, now: float) -> Out:
        r = self.replicas.get(msg.replica_id)
        if r is None:
            return []
        if r.ready and not msg.ready and msg.last_error:  # its engine died: restarted
            self.series.on_engine_restart(r.pool_id, r.id)
        r.connected = True
        r.engine_version = msg.engine_version
        r.last_error = msg.last_error
        r.ready = msg.ready
        r.start_failures = msg.start_failures
        r.circuit_open = msg.circuit_open
        if msg.ready:
            refusal = self.pools.accept_version(r, msg.engine_version)
            if refusal:
                r.ready = False
                r.last_error = refusal
        return self.dispatch(now) if r.ready else []

    def peer_down(self, ident: str, reason: str, now: float) -> Out:
        out: Out = []
        peer = Peer(ident)
        if peer.role == "supervisor":
            r = self.replicas.get(peer.replica_id)
            if r is None:
                return out
            r.ready = False
            r.connected = False
            r.last_error = r.last_down = reason
            err = p.ErrorInfo(
                Code.WORKER_RESET.value,
                f"engine supervisor for replica {r.id} died: {reason}",
                engine=r.engine,
                pool_id=r.pool_id,
            )
            for rid, tid in list(self._aborts.items()):
                if tid in r.active:
                    del self._aborts[rid]
            orphans = self._orphans.setdefault(r.id, [])
            for t in self.tasks.values():
                if t.replica != r.id:
                    continue
                if t.state is State.RUNNING:
                    self.fail_task(t, err, now, out)
                    orphans.append(t.spec.task_id)
                if t.replayable:
                    t.replayable = False  # its transcript is lost with the process
                    t.error = err
        elif peer.role == "frontend":
            out += self.frontend_lost(peer.frontend_index, now)
        return out
