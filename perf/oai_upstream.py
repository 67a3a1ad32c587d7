"""A bare OpenAI-compatible server over the same mock engine processes orchd runs: the upstream
the LiteLLM baseline proxies to. LiteLLM needs an OpenAI endpoint and the mock engine speaks
only orchd's ZeroMQ engine protocol, so this stands where an engine's own API server (vLLM's,
say) would: one process, uvicorn + starlette, the engines on their PAIR sockets (``EngSubmit``
in, ``EngStep`` out, read from ``loop.add_reader``), chunks encoded with orchd's own
``ChunkShape`` (no JSON encoding per token), one write per engine step per stream.

    python -m perf.oai_upstream --port 9100 --engines 2 --mock '{"ttft_ms": 0, "itl_ms": 0}'
    POST /v1/chat/completions, POST /v1/completions (streamed or not), GET /v1/models
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import uvicorn
import zmq
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from engine_procs.mock_engine import vocab
from ipc import openai_frames as oa
from ipc import protocol as p
from ipc.frames import json_string
from orchd.config import MockEngine


class _Stream:
    """One request's bytes not yet written, and whether its engine has finished it."""

    __slots__ = (
        "shape", "buf", "done", "waiter", "seq", "tokens", "prompt_tokens", "usage", "sock",
    )  # fmt: skip

    def __init__(self, shape: oa.ChunkShape, usage: bool) -> None:
        self.shape = shape
        self.buf = bytearray()
        self.done = False
        self.waiter: asyncio.Future[None] | None = None
        self.seq = 0
        self.tokens = 0
        self.prompt_tokens = 0
        self.usage = usage
        self.sock: zmq.Socket[bytes] | None = None  # its engine's

    def wake(self) -> None:
        w = self.waiter
        if w is not None and not w.done():
            w.set_result(None)


class Engines:
    """``n`` mock engine processes with config ``mock``, and the streams they feed."""

    def __init__(self, n: int, mock: dict[str, Any]) -> None:
        self.dir = tempfile.mkdtemp(prefix="orchd-upstream-")
        self.cfg = msgspec.convert(mock, MockEngine)
        self.vocab = [json_string(w) for w in vocab(self.cfg.vocab_size)]
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket[bytes]] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        cfg_json = msgspec.json.encode(self.cfg).decode()
        for i in range(n):
            addr = f"ipc://{self.dir}/engine-{i}.sock"
            s = self.ctx.socket(zmq.PAIR)
            s.setsockopt(zmq.SNDHWM, 1024)
            s.setsockopt(zmq.RCVHWM, 64)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(addr)
            self.socks.append(s)
            self.procs.append(
                subprocess.Popen([sys.executable, "-m", "engine_procs.mock_engine", addr, cfg_json])
            )
        for s in self.socks:
            if not s.poll(30_000):
                self.close()
                raise RuntimeError("mock engine not ready after 30 s")
            assert isinstance(p.decode_engine(s.recv()), p.EngReady)
        self.streams: dict[int, _Stream] = {}
        self.rids = itertools.count(1)
        self.rr = itertools.count()

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        for s in self.socks:
            loop.add_reader(s.getsockopt(zmq.FD), self._read, s)

    def submit(self, st: _Stream, prompt: str, seed: int, max_tokens: int) -> int:
        rid = next(self.rids)
        self.streams[rid] = st
        sock = st.sock = self.socks[next(self.rr) % len(self.socks)]
        sock.send(p.encode(p.EngSubmit(rid, prompt, seed, max_tokens)))
        self._read(sock)  # ZeroMQ's FD is edge-triggered: a send may have eaten the edge
        return rid

    def abort(self, rid: int) -> None:
        st = self.streams.pop(rid, None)
        if st is not None and st.sock is not None:
            st.sock.send(p.encode(p.EngAbort(rid)))

    def _read(self, sock: zmq.Socket[bytes]) -> None:
        streams, vj = self.streams, self.vocab
        while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
            msg = p.decode_engine(sock.recv(zmq.NOBLOCK))
            if not isinstance(msg, p.EngStep):
                continue
            for rid, n in msg.prompts:
                if (st := streams.get(rid)) is not None:
                    st.prompt_tokens = n
            for rid, toks in msg.tokens:
                st = streams.get(rid)
                if st is None:
                    continue
                shape, buf = st.shape, st.buf
                for t in toks:
                    st.seq += 1
                    buf += oa.data_frame(st.seq, shape.token(vj[t]))
                st.tokens += len(toks)
                st.wake()
            for rid, reason in msg.finished:
                if (st := streams.pop(rid, None)) is not None:
                    self._end(st, reason)
            for rid, _why in msg.errors:
                if (st := streams.pop(rid, None)) is not None:
                    st.seq += 1
                    st.buf += oa.error_frame(st.seq, {"error": {"message": "engine error"}})
                    st.done = True
                    st.wake()

    def _end(self, st: _Stream, reason: str) -> None:
        st.seq += 1
        st.buf += oa.data_frame(st.seq, st.shape.final(reason))
        if st.usage:
            st.seq += 1
            use = oa.encode(oa.usage(st.prompt_tokens, st.tokens))
            st.buf += oa.data_frame(st.seq, st.shape.usage_only(use))
        st.buf += oa.DONE
        st.done = True
        st.wake()

    def close(self) -> None:
        for pr in self.procs:
            with contextlib.suppress(OSError):
                pr.kill()
                pr.wait(5)
        for s in self.socks:
            s.close(0)
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)


def _prompt(body: dict[str, Any]) -> str:
    if "messages" in body:
        parts = []
        for m in body["messages"]:
            c = m.get("content") or ""
            if isinstance(c, list):
                c = "".join(x.get("text", "") for x in c if isinstance(x, dict))
            parts.append(f"{m.get('role', 'user')}: {c}")
        return "\n".join(parts)
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else "".join(prompt)


def app_for(engines: Engines, model: str) -> Starlette:
    ids = itertools.count()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engines.attach(asyncio.get_running_loop())
        yield

    async def complete(request: Request, kind: str) -> Response:
        try:
            body = msgspec.json.decode(await request.body())
            max_tokens = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16)
            seed = int(body.get("seed") or 0)
        except (msgspec.DecodeError, TypeError, ValueError, AttributeError) as e:
            err = {"error": {"message": str(e), "type": "invalid_request_error"}}
            return Response(oa.encode(err), 400, media_type="application/json")
        tid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-up{next(ids)}"
        name = body.get("model") or model
        created = int(time.time())
        stream = bool(body.get("stream"))
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        st = _Stream(oa.ChunkShape(kind, tid, name, created), usage)
        if stream and kind == "chat":
            st.buf += oa.data_frame(0, st.shape.role())
        rid = engines.submit(st, _prompt(body), seed, max_tokens)
        loop = asyncio.get_running_loop()

        async def wait() -> None:
            while not st.buf and not st.done:
                st.waiter = loop.create_future()
                await st.waiter

        if not stream:
            try:
                while not st.done:
                    st.buf.clear()  # the text comes from the tokens below, not the chunks
                    await wait()
            finally:
                engines.abort(rid)
            return Response(_whole(st, kind, tid, name, created), media_type="application/json")

        async def frames() -> AsyncIterator[bytes]:
            try:
                while True:
                    await wait()
                    out = bytes(st.buf)
                    st.buf.clear()
                    yield out
                    if st.done and not st.buf:
                        return
            finally:
                if not st.done:
                    engines.abort(rid)

        return StreamingResponse(
            frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    async def chat(request: Request) -> Response:
        return await complete(request, "chat")

    async def completions(request: Request) -> Response:
        return await complete(request, "completions")

    async def models(request: Request) -> Response:
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "perf"}]
        return Response(oa.encode({"object": "list", "data": data}), media_type="application/json")

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ],
        lifespan=lifespan,
    )


def _whole(st: _Stream, kind: str, tid: str, model: str, created: int) -> bytes:
    """A response that did not stream: the token count is what the bench needs, not text."""
    text = json_string(" tok" * st.tokens)
    use = oa.usage(st.prompt_tokens, st.tokens)
    return oa.completion_body(kind, tid, model, created, text, "length", use)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--mock", default="{}", help="the mock engine's config, JSON")
    ap.add_argument("--model", default="mock:tiny")
    a = ap.parse_args()
    engines = Engines(a.engines, msgspec.json.decode(a.mock.encode()))
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((a.host, a.port))
    try:
        uvicorn.Server(
            uvicorn.Config(
                app_for(engines, a.model),
                loop="uvloop",
                http="httptools",
                access_log=False,
                log_level="warning",
            )
        ).run(sockets=[sock])
    finally:
        engines.close()


if __name__ == "__main__":
    main()
