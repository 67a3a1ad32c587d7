"""Fake engine servers speaking each engine's exact wire format, for adapter tests.

Dialects (taken from each engine's public documentation; see the adapter modules):
``llamacpp`` (llama-server ``/completion``, ``/v1/chat/completions``, ``/health``,
``/props``), ``openai`` (vLLM-style ``/v1/completions``, ``/v1/chat/completions``,
``/v1/embeddings``, ``/v1/models``, ``/version``), ``tgi`` (``/generate_stream``, the Messages
API ``/v1/chat/completions``, ``/info``, ``/health``), ``triton`` (generate extension and the
v2 readiness endpoints). Output is seeded-deterministic: :func:`tokens_for` says what a request
will produce (a chat's prompt is :func:`render_chat` of its messages), :func:`prompt_tokens`
the prompt length a fake reports where its engine does, and :func:`embedding_for` an input's
vector. Faults are set when the fake is built and apply to every generation request.

Run in-process (``await fake.start()``), in a thread (``fake.start_in_thread()``) or as a
process: ``python -m tests.fakes.engines llamacpp --port N [--exit-after K]``.

The ``llamacpp`` and ``openai`` dialects are also run against the real thing: a llama.cpp
server built in the test suite (tests/integration/test_llama_cpp.py); their fakes stay for the
faults a real server will not produce on demand. TGI and Triton have no CPU build we can
install, so their fakes are all there is: the ``Tgi`` and ``Triton`` dialects cite the sources
they imitate and say where they differ.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from dataclasses import dataclass, field

from tests.fakes.dialects import (
    DIALECTS,
    MODEL,
    Dialect,
    Seen,
    embedding_for,
    prompt_tokens,
    render_chat,
    tokens_for,
)
from tests.fakes.http import HttpServer, Request

__all__ = [
    "MODEL",
    "FakeEngine",
    "Faults",
    "Seen",
    "embedding_for",
    "prompt_tokens",
    "render_chat",
    "tokens_for",
]


@dataclass
class Faults:
    first_token_delay_s: float = 0.0
    token_delay_s: float = 0.0
    disconnect_after: int = 0  # cut the connection after N tokens
    malformed_after: int = 0  # send a malformed event after N tokens
    error_after: int = 0  # the engine reports an error in the stream after N tokens
    eos_at: int = 0  # the model stops by itself after N tokens (reason "stop")
    reject_503: int = 0  # answer the first N generation requests with 503
    retry_after: str = "2"
    loading_s: float = 0.0  # health says "loading" for this long after start
    exit_after: int = 0  # process mode: exit after N finished generation requests


@dataclass
class FakeEngine:
    dialect: str
    faults: Faults = field(default_factory=Faults)
    version: str = "fake-1.2.3"
    n_ctx: int = 4096
    slots: int = 4
    seen: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.dialect not in DIALECTS:
            raise ValueError(f"unknown dialect {self.dialect}")
        self.http = HttpServer(self.handle)
        self.started = time.monotonic()
        self.finished_count = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int:
        return self.http.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http.port}"

    @property
    def canceled(self) -> list[Seen]:
        return [s for s in self.seen if s.canceled]

    async def start(self, port: int = 0) -> FakeEngine:
        self.started = time.monotonic()
        await self.http.start(port=port)
        return self

    async def stop(self) -> None:
        await self.http.stop()

    def start_in_thread(self) -> FakeEngine:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            loop.run_until_complete(self.start())
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, daemon=True, name=f"fake-{self.dialect}")
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("fake engine did not start")
        return self

    def stop_thread(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    # ------------------------------------------------------------ routing

    def dialect_params(self, seen: Seen) -> tuple[str, int, int]:
        """(prompt as generated from, seed, max tokens) of a generation request it saw."""
        return DIALECTS[self.dialect].params(seen.body)

    @property
    def loading(self) -> bool:
        return time.monotonic() - self.started < self.faults.loading_s

    async def handle(self, req: Request) -> None:
        d = DIALECTS[self.dialect]
        if req.method == "GET":
            status, body = d.get(self, req.path)
            await req.respond(status, body)
            return
        generate = d.is_generate(req.path)
        if req.method != "POST" or not (generate or d.is_embed(req.path)):
            await req.respond(404, {"error": f"no route {req.method} {req.path}"})
            return
        body = req.json()
        seen = Seen(req.path, body)
        self.seen.append(seen)
        if len(self.seen) <= self.faults.reject_503:
            await req.respond(
                503, {"error": "engine overloaded"}, {"Retry-After": self.faults.retry_after}
            )
            return
        if not generate:  # an embedding: one JSON answer
            await self.embed(d, req, seen)
            return
        await self.stream(d, req, seen)
        if seen.finished:
            self.finished_count += 1
            if self.faults.exit_after and self.finished_count >= self.faults.exit_after:
                await asyncio.sleep(0)
                os._exit(3)

    async def embed(self, d: Dialect, req: Request, seen: Seen) -> None:
        """Answer an embedding request (after ``first_token_delay_s``, unless the client
        leaves first: then it is ``canceled``)."""
        delay = self.faults.first_token_delay_s
        if delay:
            req.watch()
            if await req.wait_gone(delay):
                seen.canceled = True
                return
        status, answer = d.embed(self, seen.body)
        await req.respond(status, answer)
        seen.finished = status == 200

    async def stream(self, d: Dialect, req: Request, seen: Seen) -> None:
        f = self.faults
        prompt, seed, n = d.params(seen.body)
        toks = tokens_for(seed, prompt, n)
        if f.eos_at:
            toks = toks[: f.eos_at]
        seen.toks = toks
        await req.start_stream()
        if f.first_token_delay_s:
            if self.dialect == "llamacpp":
                await req.send(b": ping\n\n")  # llama-server's keep-alive comment
            if await req.wait_gone(f.first_token_delay_s):
                seen.canceled = True
                return
        for i, text in enumerate(toks):
            if f.disconnect_after and i == f.disconnect_after:
                req.cut()
                return
            if f.malformed_after and i == f.malformed_after:
                await req.send(b'data: {"content": "x", "stop\n\n')
            if f.error_after and i == f.error_after:
                await req.send(d.error(self, "fault injected"))
                await req.end_stream()
                seen.finished = True
                return
            last = i == len(toks) - 1
            if not await req.send(d.token(self, seen, i, text, last, len(toks) < n)):
                seen.canceled = True
                return
            if f.token_delay_s and await req.wait_gone(f.token_delay_s):
                seen.canceled = True
                return
        if not await req.send(d.final(self, seen, toks, len(toks) < n)):
            seen.canceled = True
            return
        await req.end_stream()
        seen.finished = True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dialect", choices=sorted(DIALECTS))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--exit-after", type=int, default=0)
    ap.add_argument("--loading-s", type=float, default=0.0)
    ap.add_argument("--token-delay-s", type=float, default=0.0)
    ap.add_argument("--version", default="fake-1.2.3")
    ap.add_argument("--model-path", default="", help="the model it 'loads': shown in its version")
    args = ap.parse_args(argv)
    faults = Faults(
        exit_after=args.exit_after, loading_s=args.loading_s, token_delay_s=args.token_delay_s
    )
    version = args.version + (f"+{os.path.basename(args.model_path)}" if args.model_path else "")
    fake = FakeEngine(args.dialect, faults, version=version)

    async def serve() -> None:
        await fake.start(args.port)
        print(f"fake {args.dialect} engine listening on {fake.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
