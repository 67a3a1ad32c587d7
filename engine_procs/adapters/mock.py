"""Adapter for the mock engine process (``engine_procs/mock_engine.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

import msgspec
import zmq
import zmq.asyncio

from engine_procs.adapters.base import EngineAdapter, EngineRequest, EngineSink
from engine_procs.frames import json_string
from engine_procs.mock_engine import vocab
from engine_procs.proc import die_with_parent
from ipc import protocol as p
from orchd.config import Replica


class MockAdapter(EngineAdapter):
    name = "mock"

    def __init__(self, replica: Replica, engine_addr: str, sink: EngineSink) -> None:
        super().__init__(replica, engine_addr, sink)
        self._vocab_json = [json_string(w) for w in vocab(replica.mock.vocab_size)]
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._resume = asyncio.Event()
        self._resume.set()
        self._stopping = False
        self._out: list[bytes] = []

    async def start(self, timeout_s: float) -> None:
        self._out = []  # nothing queued for a previous engine goes to this one
        path = self.engine_addr.removeprefix("ipc://")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = self._ctx.socket(zmq.PAIR)
        sock.setsockopt(zmq.SNDHWM, 1024)
        sock.setsockopt(zmq.RCVHWM, 4)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.engine_addr)
        self._sock = sock
        cfg_json = msgspec.json.encode(self.replica.mock).decode()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "engine_procs.mock_engine",
            self.engine_addr,
            cfg_json,
            self.replica.model_ref,
            preexec_fn=die_with_parent,
            stderr=asyncio.subprocess.PIPE,
        )
        proc = self._proc
        hello = asyncio.ensure_future(sock.recv())
        died = asyncio.ensure_future(proc.wait())
        done, _ = await asyncio.wait(
            {hello, died}, timeout=timeout_s, return_when="FIRST_COMPLETED"
        )
        if hello not in done:
            hello.cancel()
            died.cancel()
            why = f"mock engine not ready after {timeout_s}s"
            if died in done:
                err = (
                    (await proc.stderr.read()).decode(errors="replace").strip()
                    if proc.stderr
                    else ""
                )
                why = f"mock engine exited with status {proc.returncode}: {err or 'no message'}"
            await self.stop()
            raise RuntimeError(why)
        died.cancel()
        ready = p.decode_engine(hello.result())
        if not isinstance(ready, p.EngReady):
            await self.stop()
            raise RuntimeError(f"mock engine said {type(ready).__name__} instead of EngReady")
        self.engine_version = ready.engine_version
        self._stopping = False
        self._reader = asyncio.create_task(self._read())
        self._watch = asyncio.create_task(self._watch_proc())

    def engine_pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def _read(self) -> None:
        assert self._sock is not None
        while True:
            if self.paused:
                self._resume.clear()
                await self._resume.wait()
            self._apply(await self._sock.recv())

    def _apply(self, data: bytes) -> None:
        msg = p.decode_engine(data)
        if not isinstance(msg, p.EngStep):
            return
        sink, vj = self.sink, self._vocab_json
        if self.replica.mock.stamp_tokens:
            stamp = json_string(str(msg.t_ns))
            for rid, toks in msg.tokens:
                sink.on_tokens(rid, [stamp] * len(toks))
        else:
            for rid, toks in msg.tokens:
                sink.on_tokens(rid, [vj[t] for t in toks])
        for rid, reason in msg.finished:
            sink.on_finish(rid, reason)
        for rid, message in msg.errors:
            sink.on_error(rid, "INTERNAL", message)
        sink.flush()  # one ring publish per engine step

    async def _watch_proc(self) -> None:
        assert self._proc is not None
        code = await self._proc.wait()
        if self._stopping:
            return
        # Take every step the engine sent before it died, then report the death.
        if self._reader is not None:
            self._reader.cancel()
        while self._sock is not None:
            try:
                self._apply(await self._sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                break
        self.sink.on_engine_dead(f"mock engine process exited with status {code}")

    def resume(self) -> None:
        super().resume()
        self._resume.set()

    def submit(self, req: EngineRequest) -> None:
        assert self._sock is not None
        msg = p.EngSubmit(req.rid, req.prompt, req.seed, req.max_tokens)
        self._send(p.encode(msg))

    def _send(self, frame: bytes) -> None:
        """Requests and aborts queued in one event-loop turn reach the engine together."""
        self._out.append(frame)
        if len(self._out) == 1:
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        if self._out and self._sock is not None:
            frames, self._out = self._out, []
            self._sock.send_multipart(frames)

    def abort(self, rid: int) -> None:
        if self._sock is not None:
            self._send(p.encode(p.EngAbort(rid)))

    async def stop(self) -> None:
        self._stopping = True
        for t in (self._reader, self._watch):
            if t is not None:
                t.cancel()
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            with contextlib.suppress(ProcessLookupError):
                await self._proc.wait()
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.engine_addr.removeprefix("ipc://"))
