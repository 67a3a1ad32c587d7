"""Fake engine servers speaking each engine's exact wire format, for adapter tests.

Dialects (taken from each engine's public documentation; see the adapter modules):
``llamacpp`` (llama-server ``/completion``, ``/health``, ``/props``), ``openai`` (vLLM-style
``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``, ``/version``), ``tgi``
(``/generate_stream``, ``/info``, ``/health``), ``triton`` (generate extension and the v2
readiness endpoints). Output is seeded-deterministic: :func:`tokens_for` says what a request
will produce. Faults are set when the fake is built and apply to every generation request.

Run in-process (``await fake.start()``), in a thread (``fake.start_in_thread()``) or as a
process: ``python -m tests.fakes.engines llamacpp --port N [--exit-after K]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.http import HttpServer, Request

VOCAB = [" hello", " world", '"', "\\", "\n", "é", " 日本", " 🙂", " the", " a", " b", "</x>"]
MODEL = "fake-model"


def tokens_for(seed: int, prompt: str, n: int) -> list[str]:
    rng = random.Random(f"{seed}\0{prompt}")
    return [rng.choice(VOCAB) for _ in range(n)]


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
class Seen:
    path: str
    body: dict[str, Any]
    canceled: bool = False  # the client went away before the stream ended
    finished: bool = False


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

    @property
    def loading(self) -> bool:
        return time.monotonic() - self.started < self.faults.loading_s

    async def handle(self, req: Request) -> None:
        d = DIALECTS[self.dialect]
        if req.method == "GET":
            status, body = d.get(self, req.path)
            await req.respond(status, body)
            return
        if req.method != "POST" or not d.is_generate(req.path):
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
        await self.stream(d, req, seen)
        if seen.finished:
            self.finished_count += 1
            if self.faults.exit_after and self.finished_count >= self.faults.exit_after:
                await asyncio.sleep(0)
                os._exit(3)

    async def stream(self, d: Dialect, req: Request, seen: Seen) -> None:
        f = self.faults
        prompt, seed, n = d.params(seen.body)
        toks = tokens_for(seed, prompt, n)
        if f.eos_at:
            toks = toks[: f.eos_at]
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


def sse(obj: Any, prefix: bytes = b"data: ") -> bytes:
    return prefix + json.dumps(obj).encode() + b"\n\n"


class Dialect:
    """How one engine names things on the wire."""

    def is_generate(self, path: str) -> bool:
        raise NotImplementedError

    def params(self, body: dict[str, Any]) -> tuple[str, int, int]:
        raise NotImplementedError

    def get(self, fake: FakeEngine, path: str) -> tuple[int, Any]:
        raise NotImplementedError

    def token(self, fake: FakeEngine, s: Seen, i: int, text: str, last: bool, eos: bool) -> bytes:
        raise NotImplementedError

    def final(self, fake: FakeEngine, s: Seen, toks: list[str], eos: bool) -> bytes:
        return b""

    def error(self, fake: FakeEngine, message: str) -> bytes:
        raise NotImplementedError


class LlamaCpp(Dialect):
    def is_generate(self, path: str) -> bool:
        return path == "/completion"

    def params(self, body: dict[str, Any]) -> tuple[str, int, int]:
        return body["prompt"], body["seed"], body["n_predict"]

    def get(self, fake: FakeEngine, path: str) -> tuple[int, Any]:
        if path == "/health":
            if fake.loading:
                err = {"code": 503, "message": "Loading model", "type": "unavailable_error"}
                return 503, {"error": err}
            return 200, {"status": "ok"}
        if path == "/props":
            return 200, {
                "default_generation_settings": {"id": 0, "n_ctx": fake.n_ctx, "params": {}},
                "total_slots": fake.slots,
                "model_path": f"/models/{MODEL}.gguf",
                "build_info": f"b{fake.version}",
                "is_sleeping": False,
            }
        return 404, {"error": "not found"}

    def token(self, fake: FakeEngine, s: Seen, i: int, text: str, last: bool, eos: bool) -> bytes:
        return sse({"index": 0, "content": text, "tokens": [i], "stop": False, "id_slot": 0})

    def final(self, fake: FakeEngine, s: Seen, toks: list[str], eos: bool) -> bytes:
        return sse(
            {
                "index": 0,
                "content": "",
                "tokens": [],
                "id_slot": 0,
                "stop": True,
                "model": MODEL,
                "tokens_predicted": len(toks),
                "tokens_evaluated": len(s.body["prompt"].split()),
                "stop_type": "eos" if eos else "limit",
                "stopping_word": "",
                "truncated": False,
                "timings": {"predicted_n": len(toks), "predicted_ms": 1.0},
            }
        )

    def error(self, fake: FakeEngine, message: str) -> bytes:
        return sse({"code": 500, "message": message, "type": "server_error"}, b"error: ")


class OpenAI(Dialect):
    def is_generate(self, path: str) -> bool:
        return path in ("/v1/completions", "/v1/chat/completions")

    def params(self, body: dict[str, Any]) -> tuple[str, int, int]:
        prompt = body["prompt"] if "prompt" in body else body["messages"][-1]["content"]
        return prompt, body["seed"], body["max_tokens"]

    def get(self, fake: FakeEngine, path: str) -> tuple[int, Any]:
        if path == "/health":
            return (503, b"") if fake.loading else (200, b"")
        if path == "/v1/models":
            model = {"id": MODEL, "object": "model", "owned_by": "vllm", "root": MODEL}
            return 200, {"object": "list", "data": [{**model, "max_model_len": fake.n_ctx}]}
        if path == "/version":
            return 200, {"version": fake.version}
        return 404, {"detail": "Not Found"}

    def _chunk(self, s: Seen, choice: dict[str, Any]) -> bytes:
        chat = s.path.endswith("chat/completions")
        kind = "chat.completion.chunk" if chat else "text_completion"
        return sse(
            {
                "id": "cmpl-fake",
                "object": kind,
                "created": 1700000000,
                "model": MODEL,
                "choices": [{"index": 0, "logprobs": None, **choice}],
            }
        )

    def token(self, fake: FakeEngine, s: Seen, i: int, text: str, last: bool, eos: bool) -> bytes:
        reason = ("stop" if eos else "length") if last else None
        if s.path.endswith("chat/completions"):
            out = b""
            if i == 0:
                out = self._chunk(s, {"delta": {"role": "assistant", "content": ""}})
            return out + self._chunk(s, {"delta": {"content": text}, "finish_reason": None})
        return self._chunk(s, {"text": text, "finish_reason": reason, "stop_reason": None})

    def final(self, fake: FakeEngine, s: Seen, toks: list[str], eos: bool) -> bytes:
        out = b""
        if s.path.endswith("chat/completions"):
            reason = "stop" if eos else "length"
            out = self._chunk(s, {"delta": {}, "finish_reason": reason})
        return out + b"data: [DONE]\n\n"

    def error(self, fake: FakeEngine, message: str) -> bytes:
        err = {"object": "error", "message": message, "type": "InternalServerError", "code": 500}
        return sse({"error": err}) + b"data: [DONE]\n\n"


class Tgi(Dialect):
    def is_generate(self, path: str) -> bool:
        return path == "/generate_stream"

    def params(self, body: dict[str, Any]) -> tuple[str, int, int]:
        p = body["parameters"]
        return body["inputs"], p["seed"], p["max_new_tokens"]

    def get(self, fake: FakeEngine, path: str) -> tuple[int, Any]:
        if path == "/health":
            if fake.loading:
                return 503, {"error": "unhealthy", "error_type": "healthcheck"}
            return 200, b""
        if path == "/info":
            return 200, {
                "model_id": MODEL,
                "model_sha": None,
                "max_concurrent_requests": fake.slots,
                "max_best_of": 2,
                "max_stop_sequences": 4,
                "max_input_tokens": fake.n_ctx - 1,
                "max_total_tokens": fake.n_ctx,
                "validation_workers": 2,
                "max_client_batch_size": 4,
                "router": "text-generation-router",
                "version": fake.version,
                "sha": None,
            }
        return 404, {"error": "not found", "error_type": "not_found"}

    def _event(self, i: int, text: str, special: bool, end: dict[str, Any] | None) -> bytes:
        token = {"id": i, "text": text, "logprob": -0.5, "special": special}
        obj = {"index": i + 1, "token": token, "generated_text": None, "details": None}
        if end is not None:
            obj.update(end)
        return sse(obj, b"data:")  # TGI (axum) writes no space after "data:"

    def _end(self, s: Seen, toks: list[str], reason: str) -> dict[str, Any]:
        details = {"finish_reason": reason, "generated_tokens": len(toks), "input_length": 3}
        return {"generated_text": "".join(toks), "details": {**details, "seed": None}}

    def token(self, fake: FakeEngine, s: Seen, i: int, text: str, last: bool, eos: bool) -> bytes:
        if last and not eos:  # the last token's event carries the end
            return self._event(i, text, False, self._end(s, s_toks(s), "length"))
        return self._event(i, text, False, None)

    def final(self, fake: FakeEngine, s: Seen, toks: list[str], eos: bool) -> bytes:
        if not eos:
            return b""
        return self._event(len(toks), "</s>", True, self._end(s, toks, "eos_token"))

    def error(self, fake: FakeEngine, message: str) -> bytes:
        return sse({"error": message, "error_type": "generation"}, b"data:")


def s_toks(s: Seen) -> list[str]:
    prompt, seed, n = Tgi().params(s.body)
    return tokens_for(seed, prompt, n)


class Triton(Dialect):
    def is_generate(self, path: str) -> bool:
        return path == f"/v2/models/{MODEL}/generate_stream"

    def params(self, body: dict[str, Any]) -> tuple[str, int, int]:
        p = body["parameters"]
        return body["text_input"], p["random_seed"], p["max_tokens"]

    def get(self, fake: FakeEngine, path: str) -> tuple[int, Any]:
        if path in ("/v2/health/ready", f"/v2/models/{MODEL}/ready"):
            return (400, b"") if fake.loading else (200, b"")
        if path == "/v2/health/live":
            return 200, b""
        if path == "/v2":
            return 200, {"name": "triton", "version": fake.version, "extensions": ["generate"]}
        return 404, {"error": f"Request for unknown model: '{path}' is not found"}

    def token(self, fake: FakeEngine, s: Seen, i: int, text: str, last: bool, eos: bool) -> bytes:
        return sse({"model_name": MODEL, "model_version": "1", "text_output": text})

    def error(self, fake: FakeEngine, message: str) -> bytes:
        return sse({"error": message})


DIALECTS: dict[str, Dialect] = {
    "llamacpp": LlamaCpp(),
    "openai": OpenAI(),
    "tgi": Tgi(),
    "triton": Triton(),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("dialect", choices=sorted(DIALECTS))
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--exit-after", type=int, default=0)
    ap.add_argument("--loading-s", type=float, default=0.0)
    ap.add_argument("--token-delay-s", type=float, default=0.0)
    ap.add_argument("--version", default="fake-1.2.3")
    args = ap.parse_args(argv)
    faults = Faults(
        exit_after=args.exit_after, loading_s=args.loading_s, token_delay_s=args.token_delay_s
    )
    fake = FakeEngine(args.dialect, faults, version=args.version)

    async def serve() -> None:
        await fake.start(args.port)
        print(f"fake {args.dialect} engine listening on {fake.url}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
