"""Adapters for engines that orchd runs as a child process speaking the engine protocol
(``EngSubmit``/``EngAbort`` in, ``EngReady``, steps and ``EngEmbedding`` answers out) over a ZeroMQ PAIR socket: the
mock engine and the built-in torch engine. Subclasses name the module to run, what to pass
it, and how to turn one step into sink calls.

The socket is one :class:`ipc.line.Line`, as the supervisor's other sockets are: steps are
read from ``loop.add_reader``, everything waiting in one go; what is sent in one event-loop
turn goes as one message; a send the engine's end will not take (it died) is held and retried
until the supervisor restarts the engine, whose new line starts empty; and a pause stops
reading, so that the engine stalls on its tiny send queue until :meth:`resume`."""

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
from ipc.line import Line
from ipc.proc import die_with_parent
from orchd import log
from orchd.config import Replica


class EngineProcessAdapter(EngineAdapter):
    module: str = ""  # run as ``python -m <module> ADDR CONFIG_JSON MODEL_REF``

    def __init__(self, replica: Replica, engine_addr: str, sink: EngineSink) -> None:
        self._line: Line | None = None  # one per engine process, made by start()
        self._paused = False
        super().__init__(replica, engine_addr, sink)
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._hello: asyncio.Future[bytes] | None = None  # until the engine's first message
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @abc.abstractmethod
    def engine_config_json(self) -> str:
        """The engine's config section, as JSON, for its command line."""

    @abc.abstractmethod
    def on_step(self, msg: p.EngineMessage) -> None:
        """Report one step to the sink (the base flushes after it)."""

    @property
    def paused(self) -> bool:
        """Set by the supervisor while its rings are backed up: the line stops reading."""
        return self._paused

    @paused.setter
    def paused(self, value: bool) -> None:
        self._paused = value
        if self._line is not None:
            self._line.paused = value

    async def start(self, timeout_s: float) -> None:
        self._close_line()  # nothing queued for a previous engine goes to this one
        path = self.engine_addr.removeprefix("ipc://")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = self._ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.SNDHWM, 1024)
        sock.setsockopt(zmq.RCVHWM, 4)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.engine_addr)
        hello = self._hello = asyncio.get_running_loop().create_future()
        line = self._line = Line(sock, self._on_frame, on_error=self._unreadable)
        line.paused = self._paused
        line.start()
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
        ready = self._decode(hello.result())
        if not isinstance(ready, p.EngReady):
            await self.stop()
            said = type(ready).__name__ if ready is not None else "something unreadable"
            raise RuntimeError(f"{self.name} engine said {said}, not EngReady")
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

    def _on_frame(self, data: bytes) -> None:
        hello = self._hello
        if hello is not None:  # the engine's first message is start()'s to read
            self._hello = None
            if not hello.done():
                hello.set_result(data)
            return
        msg = p.decode_engine(data)  # unreadable: the line calls _unreadable
        if isinstance(msg, p.EngEmbedding):  # the same for every engine: usage, then result
            self.sink.on_usage(msg.rid, msg.prompt_tokens)
            self.sink.on_embedding(msg.rid, msg.vectors)
        else:
            self.on_step(msg)
        self.sink.flush()  # one ring publish per engine step

    def _unreadable(self, error: BaseException) -> None:
        """The line failed on a step (our own engine said what nobody can read) and reads no
        more: kill the engine, so that the watcher reports its death and it is restarted."""
        if isinstance(error, msgspec.MsgspecError):
            log.error("engine sent an unreadable message; restarting it", error=repr(error))
        else:
            log.error("engine step failed in the supervisor; restarting it", error=repr(error))
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()

    @staticmethod
    def _decode(data: bytes) -> p.EngineMessage | None:
        try:
            return p.decode_engine(data)
        except msgspec.MsgspecError:
            return None

    async def _watch_proc(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        if self._stopping:
            return
        # Take every step the engine sent before it died (paused or not), then report the
        # death. The line stays: sends are held until the supervisor restarts the engine.
        if self._line is not None:
            self._line.pump(force=True)
        self.sink.on_engine_dead(f"{self.name} engine process exited with status {code}")

    def resume(self) -> None:
        self._paused = False
        if self._line is not None:
            self._line.resume()  # reads again: the FD is edge-triggered

    def submit(self, req: EngineRequest) -> None:
        assert self._line is not None
        msg = p.EngSubmit(
            req.rid,
            req.prompt,
            req.seed,
            req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            messages=req.messages,
            workload=req.workload,
            inputs=req.inputs,
        )
        self._line.send(p.encode(msg))

    def abort(self, rid: int) -> None:
        if self._line is not None:
            self._line.send(p.encode(p.EngAbort(rid)))

    def _close_line(self) -> None:
        """Drop the line and whatever it still held for its engine, and close its socket."""
        line, self._line = self._line, None
        if line is not None:
            line.discard()
            line.stop()
            line.sock.close(0)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.engine_addr.removeprefix("ipc://"))

    async def stop(self) -> None:
        self._stopping = True
        self._hello = None
        if self._line is not None:
            self._line.stop()  # nothing more from this engine reaches the sink
        if self._watch is not None:
            self._watch.cancel()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await self._proc.wait()
        self._close_line()
