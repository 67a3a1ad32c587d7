"""The frontend's line to the scheduler: requests matched to replies by ``req_id``, and
notices (fences, stream terminations) handed to the stream table.

Per-request cost matters here (every admission crosses it), so the socket is a plain
ZeroMQ DEALER driven by an :class:`ipc.line.Line` rather than zmq.asyncio futures (everything
sent in one event-loop turn goes as one multipart message, everything waiting is read in one
go), and request deadlines are swept by one timer instead of a timer per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable

import zmq

from ipc import peers
from ipc import protocol as p
from ipc.line import Line
from orchd import log
from orchd.core.errors import Code, OrchdError

REQUEST_TIMEOUT_S = 10.0
SWEEP_S = 1.0
RETRY_AFTER_MS = 1000  # advice to a client whose request the scheduler left unanswered

Notice = p.Fence | p.StreamFail | p.StreamEnd | p.Release


class SchedulerClient:
    def __init__(self, addr: str, index: int, heartbeat_s: float) -> None:
        self.addr = addr
        self.index = index
        self.ident = str(peers.frontend(index))
        self.heartbeat_s = heartbeat_s
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.ident.encode())
        self.sock.setsockopt(zmq.LINGER, 200)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # never drop or block: requests are bounded upstream
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.line = Line(self.sock, self._on_frame)
        self.ids = itertools.count(1)
        # req_id -> (future, deadline)
        self.pending: dict[int, tuple[asyncio.Future[p.Message], float]] = {}
        self.on_notice: Callable[[Notice], None] = lambda m: None
        # The open streams to re-announce to a restarted scheduler (set by the app).
        self.held: Callable[[], list[p.HeldStream]] = list
        self._timers: list[asyncio.TimerHandle] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self, timeout_s: float = 30.0) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self.sock.connect(self.addr)
        welcome = loop.create_future()
        self.pending[0] = (welcome, time.monotonic() + timeout_s)  # Welcome has no req_id
        self.line.start()
        self.send(p.Hello("frontend", self.ident, os.getpid()))
        try:
            msg = await asyncio.wait_for(welcome, timeout_s)
        finally:
            self.pending.pop(0, None)
        if not isinstance(msg, p.Welcome) or not msg.accepted:
            reason = getattr(msg, "reason", type(msg).__name__)
            raise RuntimeError(f"scheduler refused frontend {self.index}: {reason}")
        self._timers = [
            loop.call_later(self.heartbeat_s, self._heartbeat),
            loop.call_later(SWEEP_S, self._sweep),
        ]

    async def stop(self) -> None:
        for t in self._timers:
            t.cancel()
        self.line.stop()
        with contextlib.suppress(zmq.ZMQError):
            self.line.send(p.encode(p.Goodbye("frontend stopping")))
            self.line.flush()
        self.sock.close(200)

    # ---------------------------------------------------------------- sending

    def send(self, msg: p.Message) -> None:
        """Queue ``msg``; everything queued in one event-loop turn goes as one ZeroMQ
        message (one wake-up of ZeroMQ's I/O thread instead of one per request)."""
        self.line.send(p.encode(msg))

    def next_id(self) -> int:
        return next(self.ids)

    async def request(self, msg: p.Message, timeout: float = REQUEST_TIMEOUT_S) -> p.Message:
        """Send ``msg`` (its ``req_id`` taken from :meth:`next_id`) and await the answer;
        a ``Failed`` answer is raised as the :class:`OrchdError` it carries."""
        assert self._loop is not None
        req_id: int = msg.req_id  # type: ignore[union-attr]
        fut: asyncio.Future[p.Message] = self._loop.create_future()
        self.pending[req_id] = (fut, time.monotonic() + timeout)
        self.send(msg)
        try:
            reply = await fut
        finally:
            self.pending.pop(req_id, None)
        if isinstance(reply, p.Failed):
            e = reply.error
            raise OrchdError(
                e.code,
                e.message,
                engine=e.engine,
                retry_after_ms=e.retry_after_ms,
                policy_label=e.policy_label,
                pool_id=e.pool_id,
                param=e.param,
            )
        return reply

    # ---------------------------------------------------------------- receiving

    def _on_frame(self, frame: bytes) -> None:
        msg = p.decode(frame)
        if isinstance(msg, p.Fence | p.StreamFail | p.StreamEnd | p.Release):
            self.on_notice(msg)
            return
        if isinstance(msg, p.Rehello):
            # The scheduler does not know us (it took us as dead, or it is new): who we are,
            # and the streams we hold (it rebuilds who streams each task from these;
            # orchd/core/recovery.py).
            log.warning("scheduler asked this frontend to introduce itself again")
            self.send(p.Hello("frontend", self.ident, os.getpid()))
            self.send(p.Streams(self.held()))
            return
        req_id = 0 if isinstance(msg, p.Welcome) else getattr(msg, "req_id", None)
        entry = self.pending.get(req_id) if req_id is not None else None
        if entry is not None and not entry[0].done():
            entry[0].set_result(msg)
        elif isinstance(msg, p.Welcome) and not msg.accepted:
            log.error("scheduler refused this frontend", reason=msg.reason)

    # ---------------------------------------------------------------- timers

    def _sweep(self) -> None:
        """Fail requests the scheduler has not answered in time (it may be restarting)."""
        assert self._loop is not None
        now = time.monotonic()
        for fut, deadline in list(self.pending.values()):
            if deadline <= now and not fut.done():
                # Retriable: the scheduler is paused or restarting, not broken for good.
                err = OrchdError(
                    Code.POOL_UNAVAILABLE,
                    "the scheduler did not answer in time (it may be restarting); retry",
                    retry_after_ms=RETRY_AFTER_MS,
                )
                fut.set_exception(err)
        self._timers[1] = self._loop.call_later(SWEEP_S, self._sweep)

    def _heartbeat(self) -> None:
        assert self._loop is not None
        self.send(p.Heartbeat())
        self._timers[0] = self._loop.call_later(self.heartbeat_s, self._heartbeat)
