"""Adapters for engines that orchd runs as a child process speaking the engine protocol
(``EngSubmit``/``EngAbort`` in, ``EngReady`` and steps out) over a ZeroMQ PAIR socket: the
mock engine and the built-in torch engine. Subclasses name the module to run, what to pass
it, and how to turn one step into sink calls.

Steps are read from ``loop.add_reader`` on the socket's FD, everything waiting in one go, as
the supervisor reads the scheduler: no zmq.asyncio future per step on the token path."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import os
import sys

import msgspec
import zmq

from engine_procs.adapters.base import EngineAdapter, EngineRequest, EngineSink
from ipc import protocol as p
from ipc.proc import die_with_parent
from orchd import log
from orchd.config import Replica

RESEND_S = 0.01  # while the engine's end of the socket takes nothing


class EngineProcessAdapter(EngineAdapter):
    module: str = ""  # run as ``python -m <module> ADDR CONFIG_JSON MODEL_REF``

    def __init__(self, replica: Replica, engine_addr: str, sink: EngineSink) -> None:
        super().__init__(replica, engine_addr, sink)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._sock: zmq.Socket[bytes] | None = None
        self._fd = -1
        self._hello: asyncio.Future[bytes] | None = None  # until the engine's first message
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False
        self._out: list[bytes] = []
        self._retry: asyncio.TimerHandle | None = None

    @abc.abstractmethod
    def engine_config_json(self) -> str:
        """The engine's config section, as JSON, for its command line."""

    @abc.abstractmethod
    def on_step(self, msg: p.EngineMessage) -> None:
        """Report one step to the sink (the base flushes after it)."""

    async def start(self, timeout_s: float) -> None:
        self._out = []  # nothing queued for a previous engine goes to this one
        self._cancel_retry()
        self._unwatch()
        path = self.engine_addr.removeprefix("ipc://")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = self._ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.SNDHWM, 1024)
        sock.setsockopt(zmq.RCVHWM, 4)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.engine_addr)
        self._sock = sock
        loop = asyncio.get_running_loop()
        hello = self._hello = loop.create_future()
        self._fd = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        loop.add_reader(self._fd, self._readable)
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            self.module,
            self.engine_addr,
            self.engine_config_json(),
            self.replica.model_ref,
            preexec_fn=die_with_parent,
            stderr=asyncio.subprocess.PIPE,
        )
        proc = self._proc
        died = asyncio.ensure_future(proc.wait())
        done, _ = await asyncio.wait(
            {hello, died}, timeout=timeout_s, return_when="FIRST_COMPLETED"
        )
        if hello not in done:
            died.cancel()
            why = f"{self.name} engine not ready after {timeout_s}s"
            if died in done:
                err = (
                    (await proc.stderr.read()).decode(errors="replace").strip()
                    if proc.stderr
                    else ""
                )
                why = (
                    f"{self.name} engine exited with status {proc.returncode}:"
                    f" {err[-500:] or 'no message'}"
                )
            await self.stop()
            raise RuntimeError(why)
        died.cancel()
        ready = p.decode_engine(hello.result())
        if not isinstance(ready, p.EngReady):
            await self.stop()
            raise RuntimeError(f"{self.name} engine said {type(ready).__name__}, not EngReady")
        self.engine_version = ready.engine_version
        self._stopping = False
        self._watch = asyncio.create_task(self._watch_proc())
        if proc.stderr is not None:  # pass it on, so the engine never blocks on a write
            asyncio.create_task(self._forward(proc.stderr))

    @staticmethod
    async def _forward(stream: asyncio.StreamReader) -> None:
        while chunk := await stream.read(65536):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()

    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _readable(self) -> None:
        """Take every message waiting, unless the supervisor's rings are backed up (then the
        engine stalls on its tiny send queue until :meth:`resume`)."""
        sock = self._sock
        # EVENTS, not a recv that raises zmq.Again: the exception costs more than the check.
        while (
            sock is not None and not self.paused and int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN
        ):
            data = sock.recv(zmq.NOBLOCK)
            hello = self._hello
            if hello is not None:
                self._hello = None
                if not hello.done():
                    hello.set_result(data)
                continue
            msg = self._decode(data)
            if msg is None:
                if self._proc is not None and self._proc.returncode is None:
                    self._proc.kill()  # _watch_proc reports the death: the engine restarts
                return
            self._apply(msg)

    def _decode(self, data: bytes) -> p.EngineMessage | None:
        try:
            return p.decode_engine(data)
        except msgspec.MsgspecError as e:  # our own engine said what nobody can read
            log.error("engine sent an unreadable message; restarting it", error=repr(e))
            return None

    def _apply(self, msg: p.EngineMessage) -> None:
        self.on_step(msg)
        self.sink.flush()  # one ring publish per engine step

    def _unwatch(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = -1

    async def _watch_proc(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        if self._stopping:
            return
        # Take every step the engine sent before it died, then report the death.
        self._unwatch()
        while self._sock is not None:
            try:
                msg = self._decode(self._sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
            if msg is not None:
                self._apply(msg)
        self.sink.on_engine_dead(f"{self.name} engine process exited with status {code}")

    def resume(self) -> None:
        super().resume()
        asyncio.get_running_loop().call_soon(self._readable)  # the FD is edge-triggered

    def submit(self, req: EngineRequest) -> None:
        assert self._sock is not None
        msg = p.EngSubmit(
            req.rid,
            req.prompt,
            req.seed,
            req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
        )
        self._send(p.encode(msg))

    def _send(self, frame: bytes) -> None:
        """Requests and aborts queued in one event-loop turn reach the engine together."""
        self._out.append(frame)
        if len(self._out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._cancel_retry()
        if self._out and self._sock is not None:
            try:
                self._sock.send_multipart(self._out, zmq.NOBLOCK)
            except zmq.Again:
                # No engine at the other end (it died: the watcher restarts it, and a new
                # engine gets none of this) or one that stopped reading: try again shortly.
                self._retry = asyncio.get_running_loop().call_later(RESEND_S, self._flush)
                return
            self._out = []
            self._readable()  # the FD is edge-triggered: a send can hide pending input

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    def abort(self, rid: int) -> None:
        if self._sock is not None:
            self._send(p.encode(p.EngAbort(rid)))

    async def stop(self) -> None:
        self._stopping = True
        self._unwatch()
        self._cancel_retry()
        self._hello = None
        if self._watch is not None:
            self._watch.cancel()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await self._proc.wait()
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.engine_addr.removeprefix("ipc://"))
