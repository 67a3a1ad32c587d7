"""The supervisor's engines: making them, restarting them with backoff and a circuit breaker,
and reloading a new model beside the serving one (two engines coexist until the old one has
finished its tasks). A mixin of :class:`engine_procs.supervisor.Supervisor`."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import TYPE_CHECKING

import msgspec

from engine_procs.adapters import adapter_class
from engine_procs.adapters.base import EngineAdapter
from engine_procs.runs import Run
from ipc import protocol as p
from orchd import log
from orchd.config import Replica, Runtime
from orchd.core.errors import Code, OrchdError
from orchd.core.restart import RestartPolicy


def _now() -> float:
    return time.monotonic()


class _EngineSink:
    """What one engine reports into: the supervisor, told which engine is speaking (during a
    reload two engines run side by side, and only the dead one's tasks fail)."""

    def __init__(self, sup: EngineLifecycle) -> None:
        self.sup = sup
        self.adapter: EngineAdapter | None = None
        self.on_tokens = sup.on_tokens
        self.on_finish = sup.on_finish
        self.on_usage = sup.on_usage
        self.on_error = sup.on_error
        self.flush = sup.flush

    def on_engine_dead(self, reason: str) -> None:
        assert self.adapter is not None
        self.sup.on_engine_dead(reason, self.adapter)


class EngineLifecycle:
    # State the supervisor owns (declared here for the type checker).
    replica: Replica
    rt: Runtime
    index: int
    engine_seq: itertools.count[int]
    adapter: EngineAdapter
    adapter_load: dict[EngineAdapter, int]
    retiring: set[EngineAdapter]
    prepared: dict[int, EngineAdapter]
    runs: dict[str, Run]
    ready: bool
    restarting: bool
    last_error: str
    restart_policy: RestartPolicy
    stopping: asyncio.Event

    if TYPE_CHECKING:

        def send(self, msg: p.Message) -> None: ...
        def status(self) -> None: ...
        def flush(self) -> None: ...
        def on_tokens(self, rid: int, texts_json: list[bytes]) -> None: ...
        def on_finish(self, rid: int, reason: str) -> None: ...
        def on_usage(self, rid: int, prompt_tokens: int) -> None: ...
        def on_error(
            self, rid: int, code: str, message: str, retry_after_ms: int | None = None
        ) -> None: ...
        def _fail(self, run: Run, err: OrchdError) -> None: ...

    def worker_reset(self, what: str) -> OrchdError:
        """WORKER_RESET for a task whose engine is gone: ``engine of replica r0 <what>``."""
        return OrchdError(
            Code.WORKER_RESET,
            f"engine of replica {self.replica.id} {what}",
            engine=self.replica.engine,
            pool_id=self.replica.pool_id,
        )

    def _make_adapter(self, replica: Replica) -> EngineAdapter:
        n = next(self.engine_seq)
        addr = self.rt.engine_addr(self.index) + (f".{n}" if n else "")
        sink = _EngineSink(self)
        adapter = adapter_class(replica.adapter_name)(replica, addr, sink)
        sink.adapter = adapter
        return adapter

    def _release_adapter(self, run: Run) -> None:
        a = run.adapter
        if a is None:
            return
        run.adapter = None
        left = self.adapter_load.get(a, 1) - 1
        self.adapter_load[a] = left
        if left <= 0:
            self.adapter_load.pop(a, None)
            if a in self.retiring:
                self.retiring.discard(a)
                asyncio.get_running_loop().create_task(a.stop())

    def on_engine_dead(self, reason: str, adapter: EngineAdapter | None = None) -> None:
        adapter = adapter or self.adapter
        log.error("engine died", replica_id=self.replica.id, reason=reason)
        current = adapter is self.adapter
        if current:
            self.ready = False
            self.last_error = reason
            self.restart_policy.died(_now())
        for run in [r for r in self.runs.values() if r.adapter is adapter]:
            self._fail(run, self.worker_reset(f"died: {reason}"))
        self.flush()
        if not current:
            return  # a retiring or prepared engine: the serving one is unaffected
        self.status()
        if not self.stopping.is_set() and not self.restarting:
            asyncio.get_running_loop().create_task(self.start_engine())

    # ---------------------------------------------------------------- reload

    async def reload_prepare(self, msg: p.ReloadPrepare) -> None:
        """Start an engine with the new model beside the serving one; report, don't switch."""
        replica = msgspec.structs.replace(self.replica, model_ref=msg.model_ref)
        new = self._make_adapter(replica)
        if not new.can_reload():
            error = (
                f"replica {replica.id}'s {replica.engine} engine is a server orchd does not"
                " start (no endpoint.command), so orchd cannot load another model into it;"
                " reload that server yourself"
            )
            self.send(p.ReloadReady(msg.req_id, False, error=error))
            return
        try:
            await new.start(timeout_s=self.replica.endpoint.ready_timeout_s)
        except Exception as e:
            with contextlib.suppress(Exception):
                await new.stop()
            log.error("reload: engine failed to start", model_ref=msg.model_ref, error=str(e))
            self.send(p.ReloadReady(msg.req_id, False, error=f"engine failed to start: {e}"))
            return
        self.prepared[msg.req_id] = new
        self.send(p.ReloadReady(msg.req_id, True, new.engine_version))

    def reload_commit(self, msg: p.ReloadCommit) -> None:
        new = self.prepared.pop(msg.req_id, None)
        if new is None:
            return
        old = self.adapter
        self.adapter = new
        self.replica = new.replica
        if self.adapter_load.get(old):
            self.retiring.add(old)  # it finishes its running tasks first
        else:
            asyncio.get_running_loop().create_task(old.stop())
        log.info("reloaded", replica_id=self.replica.id, model_ref=self.replica.model_ref)
        self.ready = True
        self.last_error = ""
        self.status()

    # ---------------------------------------------------------------- lifecycle

    async def start_engine(self) -> None:
        self.restarting = True
        policy = self.restart_policy
        try:
            while not self.stopping.is_set():
                delay = policy.delay()
                if delay:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stopping.wait(), delay)
                    if self.stopping.is_set():
                        return
                with contextlib.suppress(Exception):
                    await self.adapter.stop()
                try:
                    await self.adapter.start(timeout_s=self.replica.endpoint.ready_timeout_s)
                except Exception as e:
                    policy.start_failed()
                    self.last_error = f"engine failed to start: {e}"
                    log.error("engine failed to start", replica_id=self.replica.id, error=str(e))
                    if policy.open:
                        self.last_error += (
                            f" (circuit open after {policy.failures} failures in a row;"
                            f" next try in {policy.cooldown_s:g}s)"
                        )
                        log.error(
                            "engine circuit open",
                            replica_id=self.replica.id,
                            failures=policy.failures,
                            cooldown_s=policy.cooldown_s,
                        )
                    self.status()
                    continue
                policy.ready(_now())
                self.ready = True
                log.info(
                    "engine ready",
                    replica_id=self.replica.id,
                    engine_version=self.adapter.engine_version,
                    engine_pid=self.adapter.engine_pid(),
                )
                self.status()
                return
        finally:
            self.restarting = False
