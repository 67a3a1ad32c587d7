"""The engines of one replica, sans-IO: the serving one, a reload's prepared one, and retiring
ones that finish their tasks before they stop; when to (re)start them (backoff and a circuit
breaker, :class:`orchd.core.restart.RestartPolicy`), and what the replica reports of them.

Part of the supervisor's core (:mod:`engine_procs.supervisor_core`): it appends its effects
to the core's list, and the core decides what happens to the tasks of an engine that died.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import msgspec

from engine_procs.runs import NO_ENGINE
from engine_procs.supervisor_effects import (
    AbortRequest,
    Effect,
    Log,
    PrepareEngine,
    Send,
    StartEngine,
    StopEngine,
)
from ipc import protocol as p
from orchd.config import Config, Replica
from orchd.core.errors import Code, OrchdError
from orchd.core.restart import RestartPolicy


@dataclass(slots=True)
class Engine:
    id: int
    model_ref: str
    version: str = ""
    load: int = 0  # tasks it serves
    retiring: bool = False  # replaced by a reload: it stops once idle


class EngineSet:
    def __init__(self, cfg: Config, replica: Replica, out: list[Effect]) -> None:
        self.replica = replica
        self.out = out
        self.policy = RestartPolicy(
            cfg.server.restart_backoff_ms / 1000.0, cfg.server.restart_backoff_max_ms / 1000.0
        )
        self.ids = itertools.count(1)
        self.engines: dict[int, Engine] = {0: Engine(0, replica.model_ref)}
        self.current = 0
        self.prepared: dict[int, int] = {}  # reload req id -> engine
        self.ready = False
        self.restarting = False
        self.last_error = ""

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self.out.append(Log(level, event, fields))

    def version(self, eid: int | None = None) -> str:
        eng = self.engines.get(self.current if eid is None else eid)
        return eng.version if eng is not None else self.engines[self.current].version

    def status(self) -> None:
        """Tell the scheduler the replica's whole state (also what a scheduler that forgot
        this replica needs to take it back)."""
        r, policy = self.replica, self.policy
        msg = p.ReplicaStatus(
            r.id,
            self.ready,
            r.engine,
            self.version(),
            self.last_error,
            model_ref=r.model_ref,
            slots=r.slots,
            start_failures=0 if self.ready else policy.failures,
            circuit_open=policy.open,
        )
        self.out.append(Send(msg))

    def worker_reset(self, what: str) -> OrchdError:
        """WORKER_RESET for a task whose engine is gone: ``engine of replica r0 <what>``."""
        return OrchdError(
            Code.WORKER_RESET,
            f"engine of replica {self.replica.id} {what}",
            engine=self.replica.engine,
            pool_id=self.replica.pool_id,
        )

    # ---------------------------------------------------------------- tasks on engines

    def acquire(self) -> int:
        """A new task goes to the serving engine."""
        self.engines[self.current].load += 1
        return self.current

    def release(self, eid: int, rid: int, *, engine_done: bool) -> None:
        """A task left ``eid`` (aborted there unless the engine ended it itself)."""
        if eid == NO_ENGINE:
            return
        if not engine_done:
            self.out.append(AbortRequest(eid, rid))
        eng = self.engines.get(eid)
        if eng is None:
            return
        eng.load -= 1
        if eng.load <= 0 and eng.retiring:
            del self.engines[eid]
            self.out.append(StopEngine(eid))

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Bring up the first engine."""
        self.restarting = True
        self.out.append(StartEngine(self.current, 0.0))

    def on_ready(self, eid: int, version: str, now: float) -> None:
        if eid != self.current:
            return
        self.policy.ready(now)
        self.engines[eid].version = version
        self.ready = True
        self.restarting = False
        self._log("info", "engine ready", replica_id=self.replica.id, engine_version=version)
        self.status()

    def on_start_failed(self, eid: int, error: str) -> None:
        policy = self.policy
        policy.start_failed()
        self.last_error = f"engine failed to start: {error}"
        self._log("error", "engine failed to start", replica_id=self.replica.id, error=error)
        if policy.open:
            self.last_error += (
                f" (circuit open after {policy.failures} failures in a row;"
                f" next try in {policy.cooldown_s:g}s)"
            )
            self._log(
                "error",
                "engine circuit open",
                replica_id=self.replica.id,
                failures=policy.failures,
                cooldown_s=policy.cooldown_s,
            )
        self.status()
        self.out.append(StartEngine(eid, policy.delay()))

    def on_dead(self, eid: int, reason: str, now: float) -> None:
        """After the core failed the engine's tasks: restart it if it was serving."""
        if eid != self.current:
            eng = self.engines.get(eid)
            if eng is not None and eng.retiring:
                del self.engines[eid]
            return  # a retiring or prepared engine: the serving one is unaffected
        self.ready = False
        self.last_error = reason
        self.policy.died(now)
        self.status()
        if not self.restarting:
            self.restarting = True
            self.out.append(StartEngine(eid, self.policy.delay()))

    # ---------------------------------------------------------------- reload

    def prepare(self, req_id: int, model_ref: str) -> None:
        eid = next(self.ids)
        self.engines[eid] = Engine(eid, model_ref)
        self.out.append(PrepareEngine(req_id, eid, model_ref))

    def on_prepared(self, req_id: int, eid: int, ok: bool, version: str, error: str) -> None:
        """A reload's new engine is up (or failed to come up)."""
        eng = self.engines.get(eid)
        if ok and eng is not None:
            eng.version = version
            self.prepared[req_id] = eid
            self.out.append(Send(p.ReloadReady(req_id, True, version)))
            return
        self.engines.pop(eid, None)
        self._log("error", "reload: engine failed to start", error=error)
        self.out.append(Send(p.ReloadReady(req_id, False, error=error)))

    def commit(self, req_id: int) -> None:
        eid = self.prepared.pop(req_id, None)
        if eid is None:
            return
        old = self.engines[self.current]
        self.current = eid
        self.replica = msgspec.structs.replace(self.replica, model_ref=self.engines[eid].model_ref)
        if old.load:
            old.retiring = True  # it finishes its running tasks first
        else:
            del self.engines[old.id]
            self.out.append(StopEngine(old.id))
        self._log("info", "reloaded", replica_id=self.replica.id, model_ref=self.replica.model_ref)
        self.ready = True
        self.last_error = ""
        self.status()

    def abort_reload(self, req_id: int) -> None:
        eid = self.prepared.pop(req_id, None)
        if eid is not None:
            self.engines.pop(eid, None)
            self.out.append(StopEngine(eid))
