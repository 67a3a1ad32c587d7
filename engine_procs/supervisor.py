"""The engine supervisor: one process per replica.

It runs one engine through an adapter, keeps up to ``slots`` tasks in flight on it, encodes
every event once as finished SSE bytes, and publishes them into the ring of the frontend that
streams the task: all events ready after an engine step go out with one publish per ring and
at most one doorbell. It keeps each task's transcript so that a stream opened late (or on
another frontend) gets every event from the first. It survives its engine: on an engine death
every running task gets one ``WORKER_RESET`` error event and the engine is restarted.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import sys
import time
from collections import deque

import zmq

from engine_procs.adapters.base import EngineAdapter, EngineRequest
from engine_procs.publisher import Publisher
from engine_procs.runs import Run
from engine_procs.supervisor_engines import EngineLifecycle
from engine_procs.supervisor_streams import TaskStreams
from engine_procs.supervisor_timers import Timers
from ipc import protocol as p
from ipc.frames import KIND_TERMINAL, error_frame, frame
from ipc.proc import freeze_startup_heap
from orchd import log
from orchd.config import Resolved, load_resolved
from orchd.core.errors import Code, OrchdError
from orchd.core.restart import RestartPolicy


def _now() -> float:
    return time.monotonic()


class Supervisor(EngineLifecycle, Timers, TaskStreams):
    def __init__(self, res: Resolved, index: int) -> None:
        self.cfg = res.config
        self.rt = res.runtime
        self.index = index
        self.replica = self.cfg.replicas[index]
        self.ident = f"sup-{self.replica.id}"
        nfe = self.cfg.server.frontends
        self.rings = Publisher(
            [self.rt.ring_name(index, f) for f in range(nfe)],
            [self.rt.bell_path(f) for f in range(nfe)],
        )
        self.runs: dict[str, Run] = {}
        self.by_rid: dict[int, Run] = {}
        self.ended: dict[str, Run] = {}  # transcripts kept for late subscribers
        self.ended_order: deque[Run] = deque()
        self.dirty: list[Run] = []
        self.flush_scheduled = False
        self.rids = itertools.count(1)
        self.ready = False
        self.restarting = False
        self.last_error = ""
        self.restart_policy = RestartPolicy(
            self.cfg.server.restart_backoff_ms / 1000.0,
            self.cfg.server.restart_backoff_max_ms / 1000.0,
        )
        self.retention_s = self.cfg.limits.transcript_retention_ms / 1000.0 + 5.0
        # A plain DEALER read from loop.add_reader (as the frontend's client does): cheaper
        # per message than zmq.asyncio's future per recv, and dispatches are on the TTFT path.
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.ident.encode())
        self.sock.setsockopt(zmq.LINGER, 500)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block; bounded by the slots
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.fd: int = self.sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self.engine_seq = itertools.count()
        self.adapter = self._make_adapter(self.replica)
        self.adapter_load: dict[EngineAdapter, int] = {}  # runs per engine
        self.retiring: set[EngineAdapter] = set()  # replaced by a reload; stop when idle
        self.prepared: dict[int, EngineAdapter] = {}  # reload req id -> engine started
        self.queue_depth = 0
        self.checks: list[tuple[float, int, Run]] = []  # (when, rid, run): a heap
        self.decode_timeout_s = self.replica.decode_timeout_ms / 1000.0
        self.metrics_s = self.cfg.scheduling.metrics_interval_ms / 1000.0
        self.coalesce = max(1, self.cfg.scheduling.stream_interval_tokens)
        self.coalesce_s = self.cfg.scheduling.stream_interval_ms / 1000.0
        self._out: list[bytes] = []
        self.stopping = asyncio.Event()
        self.busy = asyncio.Event()  # set when a task arrives (wakes idle housekeeping)
        self._backlog_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- messages out

    def send(self, msg: p.Message) -> None:
        """Queue ``msg`` for the scheduler; one ZeroMQ message per event-loop turn."""
        self._out.append(p.encode(msg))
        if len(self._out) == 1:
            asyncio.get_running_loop().call_soon(self._flush_out)

    def _flush_out(self) -> None:
        if self._out:
            frames, self._out = self._out, []
            self.sock.send_multipart(frames, zmq.NOBLOCK)
            self._pump()  # the FD is edge-triggered: a send can hide pending input

    def status(self) -> None:
        self.send(
            p.ReplicaStatus(
                self.replica.id,
                self.ready,
                self.replica.engine,
                self.adapter.engine_version,
                self.last_error,
            )
        )

    # ---------------------------------------------------------------- messages in

    def on_dispatch(self, msg: p.Dispatch) -> None:
        spec = msg.task
        run = Run(
            spec.task_id,
            next(self.rids),
            spec,
            msg.frontend,
            msg.slot,
            _now(),
            adapter=self.adapter,
            deadline_left_ms=msg.deadline_left_ms,
            tokens_budget=msg.tokens_budget,
            time_budget_ms=msg.time_budget_ms,
            cost_budget=msg.cost_budget,
            cost_per_token=msg.cost_per_token,
            kv_warm=msg.kv_warm,
            provisional=msg.provisional,
        )
        run.t_metrics = run.t_start
        self._schedule_check(run, run.t_start)
        self.busy.set()
        self.adapter_load[self.adapter] = self.adapter_load.get(self.adapter, 0) + 1
        self.queue_depth = msg.queue_depth
        self.runs[run.task_id] = run
        self.by_rid[run.rid] = run
        if self.ready:
            # The engine first: its first token is the latency clients feel.
            seed = spec.seed if spec.seed is not None else int.from_bytes(os.urandom(8), "little")
            self.adapter.submit(
                EngineRequest(
                    run.rid,
                    spec.prompt or "",
                    seed,
                    spec.max_tokens,
                    temperature=spec.temperature,
                    top_p=spec.top_p,
                )
            )
        self._emit(
            run,
            frame(
                "started",
                0,
                {
                    "queue_position": msg.queue_position,
                    "predicted_start_ms": msg.predicted_start_ms,
                    "engine": self.replica.engine,
                    "engine_version": self.adapter.engine_version,
                    "pool_id": self.replica.pool_id,
                    "replica_id": self.replica.id,
                    "sampler_profile_version": spec.sampler_profile_version,
                    "placement": msg.placement_reason,
                },
            ),
        )
        if not self.ready:
            self._fail(run, self.worker_reset(f"is restarting: {self.last_error}"))

    def on_attach(self, msg: p.Attach) -> None:
        run = self.runs.get(msg.task_id) or self.ended.get(msg.task_id)
        if run is None:
            err = OrchdError(Code.INTERNAL, f"transcript of task {msg.task_id} is gone")
            payload = error_frame(1, err.envelope())
            self.rings.add(msg.frontend, (msg.slot, 1, KIND_TERMINAL, payload))
            self.flush()
            return
        run.frontend, run.slot = msg.frontend, msg.slot
        run.provisional = False
        run.outbox = [b"".join(run.transcript)]  # replay everything so far, then live
        self._mark(run)
        if not run.ended:
            self._schedule_check(run, _now())  # now it may owe `metrics` frames
        if run.ended:
            self.ended.pop(run.task_id, None)

    def on_claim(self, task_id: str) -> None:
        run = self.runs.get(task_id) or self.ended.get(task_id)
        if run is not None:
            run.provisional = False
            if run.ended:  # delivered in full: nobody will replay it
                run.transcript = []
                self.ended.pop(task_id, None)

    def on_detach(self, task_id: str) -> None:
        run = self.runs.get(task_id) or self.ended.get(task_id)
        if run is not None:
            run.frontend, run.provisional = -1, False
            run.outbox = []

    def on_abort(self, msg: p.Abort) -> None:
        run = self.runs.get(msg.task_id)
        if run is None:
            self.send(p.AbortDone(msg.req_id, msg.task_id, False, -1, 0))
            return
        if msg.reason in ("drained", "shutdown"):
            why = "its pool was drained" if msg.reason == "drained" else "orchd is shutting down"
            err = OrchdError(
                Code.POOL_UNAVAILABLE,
                f"task stopped: {why}",
                engine=self.replica.engine,
                pool_id=self.replica.pool_id,
                retry_after_ms=1000,
            )
            self._terminal_error(run, err)
        else:
            if run.adapter is not None:
                run.adapter.abort(run.rid)
            self._end(run, "canceled")
        self.flush()  # the terminal frame is published before we answer
        self.send(
            p.AbortDone(
                msg.req_id, msg.task_id, run.frontend >= 0, run.frontend, run.slot, run.tokens
            )
        )

    def _pump(self) -> None:
        sock = self.sock
        try:
            while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                for data in sock.recv_multipart(zmq.NOBLOCK):
                    self.on_message(p.decode(data))
        except Exception as e:  # as a dead receive loop did: say why, stop, be restarted
            log.error("supervisor failed on a scheduler message", error=repr(e))
            self.stopping.set()

    def on_message(self, msg: p.Message) -> None:
        loop = asyncio.get_running_loop()
        match msg:
            case p.Dispatch():
                self.on_dispatch(msg)
            case p.Attach():
                self.on_attach(msg)
            case p.Abort():
                self.on_abort(msg)
            case p.QueueDepth():
                self.queue_depth = msg.depth
            case p.Claim():
                self.on_claim(msg.task_id)
            case p.Detach():
                self.on_detach(msg.task_id)
            case p.ReloadPrepare():
                loop.create_task(self.reload_prepare(msg))
            case p.ReloadCommit():
                self.reload_commit(msg)
            case p.ReloadAbort():
                new = self.prepared.pop(msg.req_id, None)
                if new is not None:
                    loop.create_task(new.stop())
            case p.Welcome(accepted=False):
                log.error("scheduler refused us", reason=msg.reason)
                self.stopping.set()

    def _task_died(self, t: asyncio.Task[None]) -> None:
        """A loop that must run for ever ended: say why, and stop (the launcher restarts us)."""
        if t.cancelled() or self.stopping.is_set():
            return
        log.error("supervisor loop died", task=t.get_name(), error=repr(t.exception()))
        self.stopping.set()

    async def main(self) -> None:
        loop = asyncio.get_running_loop()
        log.defer(lambda: loop.call_soon(log.flush))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.sock.connect(self.rt.scheduler_addr)
        loop.add_reader(self.fd, self._pump)
        self.send(
            p.Hello(
                "supervisor",
                self.ident,
                os.getpid(),
                replica_id=self.replica.id,
                pool_id=self.replica.pool_id,
                slots=self.replica.slots,
            )
        )
        tasks = [
            loop.create_task(self.housekeeping()),
            loop.create_task(self.start_engine()),
        ]
        tasks[0].add_done_callback(self._task_died)
        freeze_startup_heap()
        await self.stopping.wait()
        for t in tasks:
            t.cancel()
        await self.adapter.stop()
        loop.remove_reader(self.fd)
        self.send(p.Goodbye("stopping"))
        self._flush_out()
        self.sock.close(linger=500)
        self.rings.close()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    res = load_resolved(argv[0])
    index = int(argv[1])
    log.setup(f"supervisor-{res.config.replicas[index].id}", res.config.server.log_level)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(Supervisor(res, index).main())
    return 0


if __name__ == "__main__":
    sys.exit(main())
