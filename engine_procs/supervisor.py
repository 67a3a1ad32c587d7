"""The engine supervisor process: one per replica, a thin asyncio shell around
:class:`engine_procs.supervisor_core.SupervisorCore`.

The shell moves bytes and nothing else: scheduler messages in from its ZeroMQ line, engine
reports in from the adapters, the clock in from one timer set to the core's next deadline;
the core's effects out (sends, engine submits and aborts, engine starts and stops) and its
ring records into the frontends' rings, published once per engine step with at most one
doorbell per ring. The rules (streams, coalescing, timeouts, budgets, restarts, reloads)
are all in the core.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Coroutine
from typing import Any

import msgspec
import zmq

from engine_procs.adapters import adapter_class
from engine_procs.adapters.base import EngineAdapter
from engine_procs.publisher import Publisher
from engine_procs.supervisor_core import SupervisorCore
from engine_procs.supervisor_effects import (
    AbortRequest,
    Log,
    PauseReading,
    PrepareEngine,
    Send,
    StartEngine,
    Stop,
    StopEngine,
    Submit,
)
from ipc import peers
from ipc import protocol as p
from ipc.line import Line
from ipc.proc import freeze_startup_heap
from orchd import log
from orchd.config import Replica, Resolved, load_resolved

BACKLOG_RETRY_S = 0.0005  # while a frontend's ring is full


def _now() -> float:
    return time.monotonic()


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


class _EngineSink:
    """What one engine reports into: the core, told which engine is speaking (during a reload
    two engines run side by side, and only the dead one's tasks fail)."""

    def __init__(self, sup: Supervisor, eid: int) -> None:
        self.sup = sup
        self.core = sup.core
        self.eid = eid

    def on_tokens(self, rid: int, texts_json: list[bytes]) -> None:
        self.core.tokens(rid, texts_json, _now())
        self.sup.kick()

    def on_usage(self, rid: int, prompt_tokens: int) -> None:
        self.core.usage(rid, prompt_tokens)

    def on_finish(self, rid: int, reason: str) -> None:
        self.core.finish(rid, reason, _now())
        self.sup.kick()

    def on_error(
        self, rid: int, code: str, message: str, retry_after_ms: int | None = None
    ) -> None:
        self.core.error(rid, code, message, retry_after_ms, _now())
        self.sup.kick()

    def on_embedding(self, rid: int, vectors: list[list[float]]) -> None:
        self.core.embedding(rid, vectors, _now())
        self.sup.kick()

    def on_engine_dead(self, reason: str) -> None:
        self.core.engine_dead(self.eid, reason, _now())
        self.sup.flush()

    def flush(self) -> None:
        self.sup.flush()


class Supervisor:
    def __init__(self, res: Resolved, index: int) -> None:
        cfg, rt = res.config, res.runtime
        self.rt = rt
        self.index = index
        self.replica = cfg.replicas[index]
        self.peer = peers.supervisor(self.replica.id)
        self.core = SupervisorCore(cfg, self.replica, now=_now(), random_seed=_random_seed)
        nfe = cfg.server.frontends
        self.rings = Publisher(
            [rt.ring_name(index, f) for f in range(nfe)], [rt.bell_path(f) for f in range(nfe)]
        )
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.peer.wire)
        sock.setsockopt(zmq.LINGER, 500)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block; bounded by the slots
        sock.setsockopt(zmq.RCVHWM, 0)
        self.line = Line(sock, self._on_frame, on_error=self._line_failed)
        self.hello = p.Hello("supervisor", str(self.peer), os.getpid(), replica_id=self.replica.id)
        self.engines: dict[int, EngineAdapter] = {}
        self.stopping = asyncio.Event()
        self._flush_scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self._backlog: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._sends: list[bytes] = []  # reports: sent before the records are published
        self._answers: list[bytes] = []  # sent after them

    # ---------------------------------------------------------------- inputs

    def _on_frame(self, data: bytes) -> None:
        msg = p.decode(data)
        if isinstance(msg, p.Rehello):
            self.line.send(p.encode(self.hello))  # before the core's re-announcement
        elif isinstance(msg, p.Dispatch):  # its lines carry the submitting request's id
            log.bind_task(msg.task.task_id, msg.task.cid)
        self.core.on_message(msg, _now())
        self.apply()
        self.kick()

    def _line_failed(self, e: BaseException) -> None:
        """A scheduler message we fail on: say why and stop (the launcher restarts us)."""
        log.error("supervisor failed on a scheduler message", error=repr(e))
        self.stopping.set()

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self.core.tick(_now())
        self.flush()

    # ---------------------------------------------------------------- outputs

    def kick(self) -> None:
        """Flush once this event-loop turn ends (an engine step may bring several reports)."""
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Carry out the core's effects and publish its records: one publish per ring, at
        most one doorbell each. Reports to the scheduler leave first (a client that reads a
        task's end finds the scheduler already told); answers that promise the records are in
        the ring (AbortDone) leave after them. Then set the timer to the core's next deadline."""
        self._flush_scheduled = False
        self.apply()
        line = self.line
        if self._sends:
            for frame in self._sends:
                line.send(frame)
            self._sends = []
            line.flush()
        rings = self.rings
        for frontend, slot, seq, kind, payload in self.core.flush():
            rings.add(frontend, (slot, seq, kind, payload))
        stuck = rings.publish()
        self.core.rings_backed_up(stuck)
        self.apply()
        for frame in self._sends + self._answers:
            line.send(frame)
        self._sends, self._answers = [], []
        if stuck and self._backlog is None:
            self._backlog = asyncio.get_running_loop().call_later(BACKLOG_RETRY_S, self._retry)
        self._arm()

    def _retry(self) -> None:
        self._backlog = None
        self.flush()

    def _arm(self) -> None:
        at = self.core.next_deadline()
        if at < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            loop = asyncio.get_running_loop()
            delay = max(0.0, at - _now())
            self._timer = loop.call_at(loop.time() + delay, self._on_timer)
            self._timer_at = at

    def apply(self) -> None:
        for eff in self.core.take():
            match eff:
                case Send(msg, after_rings):
                    (self._answers if after_rings else self._sends).append(p.encode(msg))
                case Submit(eid, req):
                    self.engines[eid].submit(req)
                case AbortRequest(eid, rid):
                    engine = self.engines.get(eid)
                    if engine is not None:
                        engine.abort(rid)
                case PauseReading(paused):
                    for engine in self.engines.values():
                        if paused:
                            engine.paused = True
                        else:
                            engine.resume()
                case StartEngine(eid, delay_s):
                    self._spawn(self._start_engine(eid, delay_s))
                case PrepareEngine(req_id, eid, model_ref):
                    self._spawn(self._prepare(req_id, eid, model_ref))
                case StopEngine(eid):
                    engine = self.engines.pop(eid, None)
                    if engine is not None:
                        self._spawn(engine.stop())
                case Log(level, event, fields):
                    getattr(log, level)(event, **fields)
                case Stop(reason):
                    log.error("supervisor stopping", reason=reason)
                    self.stopping.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- engines

    def _adapter(self, eid: int, replica: Replica) -> EngineAdapter:
        engine = self.engines.get(eid)
        if engine is None:
            addr = self.rt.engine_addr(self.index) + (f".{eid}" if eid else "")
            engine = adapter_class(replica.adapter_name)(replica, addr, _EngineSink(self, eid))
            self.engines[eid] = engine
        return engine

    async def _start_engine(self, eid: int, delay_s: float) -> None:
        if delay_s:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), delay_s)
        if self.stopping.is_set():
            return
        engine = self._adapter(eid, self.core.replica)
        with contextlib.suppress(Exception):
            await engine.stop()
        try:
            await engine.start(timeout_s=self.replica.endpoint.ready_timeout_s)
        except Exception as e:
            self.core.engine_start_failed(eid, str(e), _now())
        else:
            self.core.engine_ready(eid, engine.engine_version, _now())
            log.info("engine started", replica_id=self.replica.id, engine_pid=engine.engine_pid())
        self.flush()

    async def _prepare(self, req_id: int, eid: int, model_ref: str) -> None:
        """Start an engine with the new model beside the serving one; report, don't switch."""
        replica = msgspec.structs.replace(self.core.replica, model_ref=model_ref)
        engine = self._adapter(eid, replica)
        ok, error = False, ""
        if not engine.can_reload():
            error = (
                f"replica {replica.id}'s {replica.engine} engine is a server orchd does not"
                " start (no endpoint.command), so orchd cannot load another model into it;"
                " reload that server yourself"
            )
        else:
            try:
                await engine.start(timeout_s=self.replica.endpoint.ready_timeout_s)
                ok = True
            except Exception as e:
                error = f"engine failed to start: {e}"
        if not ok:
            self.engines.pop(eid, None)
            with contextlib.suppress(Exception):
                await engine.stop()
        self.core.prepared(req_id, eid, ok, engine.engine_version, error)
        self.flush()

    # ---------------------------------------------------------------- the process

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        log.defer(lambda: loop.call_soon(log.flush))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.line.sock.connect(self.rt.scheduler_addr)
        self.line.start()
        self.line.send(p.encode(self.hello))
        self.core.announce()  # nothing running: a restarted scheduler fails what it ran before
        self.core.start()
        self.flush()
        freeze_startup_heap()
        await self.stopping.wait()
        for t in list(self._tasks):
            t.cancel()
        for timer in (self._timer, self._backlog):
            if timer is not None:
                timer.cancel()
        for engine in list(self.engines.values()):
            with contextlib.suppress(Exception):
                await engine.stop()
        self.line.stop()
        self.line.send(p.encode(p.Goodbye("stopping")))
        self.line.flush()
        self.line.sock.close(linger=500)
        self.rings.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    res = load_resolved(argv[0])
    index = int(argv[1])
    s = res.config.server
    log.setup(f"supervisor-{res.config.replicas[index].id}", s.log_level, s.log_format)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(Supervisor(res, index).main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
