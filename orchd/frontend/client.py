"""The frontend's line to the scheduler: requests matched to replies by ``req_id``, and
notices (fences, stream terminations) handed to the stream table."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Callable

import zmq
import zmq.asyncio

from ipc import protocol as p
from orchd import log
from orchd.core.errors import Code, OrchdError

REQUEST_TIMEOUT_S = 10.0

Notice = p.Fence | p.StreamFail | p.StreamEnd


class SchedulerClient:
    def __init__(self, addr: str, index: int, heartbeat_s: float) -> None:
        self.addr = addr
        self.index = index
        self.ident = f"fe{index}"
        self.heartbeat_s = heartbeat_s
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, self.ident.encode())
        self.sock.setsockopt(zmq.LINGER, 200)
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[p.Message]] = {}
        self.on_notice: Callable[[Notice], None] = lambda m: None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, timeout_s: float = 30.0) -> None:
        self.sock.connect(self.addr)
        self.send(p.Hello("frontend", self.ident, os.getpid()))
        welcome = p.decode(await asyncio.wait_for(self.sock.recv(), timeout_s))
        if not isinstance(welcome, p.Welcome) or not welcome.accepted:
            reason = getattr(welcome, "reason", type(welcome).__name__)
            raise RuntimeError(f"scheduler refused frontend {self.index}: {reason}")
        self._tasks = [
            asyncio.create_task(self._recv_loop()),
            asyncio.create_task(self._heartbeat()),
        ]

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        with contextlib.suppress(zmq.ZMQError):
            self.send(p.Goodbye("frontend stopping"))
        self.sock.close(200)

    def send(self, msg: p.Message) -> None:
        self.sock.send(p.encode(msg))

    def next_id(self) -> int:
        return next(self.ids)

    async def request(self, msg: p.Message, timeout: float = REQUEST_TIMEOUT_S) -> p.Message:
        """Send ``msg`` (its ``req_id`` taken from :meth:`next_id`) and await the answer;
        a ``Failed`` answer is raised as the :class:`OrchdError` it carries."""
        req_id: int = msg.req_id  # type: ignore[union-attr]
        fut: asyncio.Future[p.Message] = asyncio.get_running_loop().create_future()
        self.pending[req_id] = fut
        self.send(msg)
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise OrchdError(Code.INTERNAL, "the scheduler did not answer in time") from None
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
            )
        return reply

    async def _recv_loop(self) -> None:
        while True:
            msg = p.decode(await self.sock.recv())
            if isinstance(msg, p.Fence | p.StreamFail | p.StreamEnd):
                self.on_notice(msg)
                continue
            req_id = getattr(msg, "req_id", None)
            fut = self.pending.get(req_id) if req_id is not None else None
            if fut is not None and not fut.done():
                fut.set_result(msg)
            elif isinstance(msg, p.Welcome) and not msg.accepted:
                log.error("scheduler refused this frontend", reason=msg.reason)

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_s)
            self.send(p.Heartbeat())
