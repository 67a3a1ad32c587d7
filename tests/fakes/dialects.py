"""Each fake engine's wire format: routes, token events, the final event, error events.

Taken from the engines' public documentation (llama.cpp tools/server/README.md; vLLM's
OpenAI-compatible server; TGI docs/openapi.json; Triton docs/protocol/extension_generate.md).
"""

from __future__ import annotations

import abc
import json
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tests.fakes.engines import FakeEngine

VOCAB = [" hello", " world", '"', "\\", "\n", "é", " 日本", " 🙂", " the", " a", " b", "</x>"]
MODEL = "fake-model"


def tokens_for(seed: int, prompt: str, n: int) -> list[str]:
    rng = random.Random(f"{seed}\0{prompt}")
    return [rng.choice(VOCAB) for _ in range(n)]


def prompt_tokens(prompt: str) -> int:
    """The fakes' tokenizer: a BOS token, then one token per whitespace-separated word."""
    return 1 + len(prompt.split())


@dataclass
class Seen:
    path: str
    body: dict[str, Any]
    canceled: bool = False  # the client went away before the stream ended
    finished: bool = False
    toks: list[str] = field(default_factory=list)  # what this request is to produce


def sse(obj: Any, prefix: bytes = b"data: ") -> bytes:
    return prefix + json.dumps(obj).encode() + b"\n\n"


class Dialect(abc.ABC):
    """How one engine names things on the wire."""

    @abc.abstractmethod
    def is_generate(self, path: str) -> bool: ...

    @abc.abstractmethod
    def params(self, body: dict[str, Any]) -> tuple[str, int, int]: ...

    @abc.abstractmethod
    def get(self, fake: FakeEngine, path: str) -> tuple[int, Any]: ...

    @abc.abstractmethod
    def token(
        self, fake: FakeEngine, s: Seen, i: int, text: str, last: bool, eos: bool
    ) -> bytes: ...

    def final(self, fake: FakeEngine, s: Seen, toks: list[str], eos: bool) -> bytes:
        return b""

    @abc.abstractmethod
    def error(self, fake: FakeEngine, message: str) -> bytes: ...


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
        # Every partial result carries both counts (to_json_non_oaicompat in
        # tools/server/server-task.cpp).
        return sse(
            {
                "index": 0,
                "content": text,
                "tokens": [i],
                "stop": False,
                "id_slot": 0,
                "tokens_predicted": i + 1,
                "tokens_evaluated": prompt_tokens(s.body["prompt"]),
            }
        )

    def final(self, fake: FakeEngine, s: Seen, toks: list[str], eos: bool) -> bytes:
        n = prompt_tokens(s.body["prompt"])
        return sse(
            {
                "index": 0,
                "content": "",
                "tokens": [],
                "id_slot": 0,
                "stop": True,
                "model": MODEL,
                "tokens_predicted": len(toks),
                "tokens_evaluated": n,
                "stop_type": "eos" if eos else "limit",
                "stopping_word": "",
                "truncated": False,
                "tokens_cached": n + len(toks) - 1,
                "timings": {
                    "cache_n": 0,
                    "prompt_n": n,
                    "prompt_ms": 1.0,
                    "prompt_per_token_ms": 1.0 / n,
                    "prompt_per_second": 1000.0 * n,
                    "predicted_n": len(toks),
                    "predicted_ms": 1.0,
                },
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

    @staticmethod
    def _usage_asked(s: Seen) -> bool:
        options = s.body.get("stream_options") or {}
        return bool(options.get("include_usage"))

    def _chunk(self, s: Seen, choice: dict[str, Any] | None) -> bytes:
        """One chunk; ``None``: the usage chunk (``choices: []``) that ends a stream whose
        request set ``stream_options.include_usage``, and then every other chunk has
        ``"usage": null`` (vLLM's serving_completion.py / serving_chat.py)."""
        chat = s.path.endswith("chat/completions")
        kind = "chat.completion.chunk" if chat else "text_completion"
        obj: dict[str, Any] = {
            "id": "cmpl-fake",
            "object": kind,
            "created": 1700000000,
            "model": MODEL,
            "choices": [] if choice is None else [{"index": 0, "logprobs": None, **choice}],
        }
        if choice is None:
            n = prompt_tokens(self.params(s.body)[0])
            done = len(s.toks)
            obj["usage"] = {"prompt_tokens": n, "total_tokens": n + done, "completion_tokens": done}
        elif self._usage_asked(s):
            obj["usage"] = None
        return sse(obj)

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
        if self._usage_asked(s):
            out += self._chunk(s, None)
        return out + b"data: [DONE]\n\n"

    def error(self, fake: FakeEngine, message: str) -> bytes:
        err = {"object": "error", "message": message, "type": "InternalServerError", "code": 500}
        return sse({"error": err}) + b"data: [DONE]\n\n"


class Tgi(Dialect):
    """TGI's ``POST /generate_stream``, which no CPU build lets us run here.

    Imitated from huggingface/text-generation-inference (v3.3): each event is a
    ``StreamResponse`` (router/src/lib.rs) ``{"index", "token": {"id", "text", "logprob",
    "special"}, "generated_text", "details"}``; ``index`` counts events from 1 (``index += 1``
    before each in ``generate_stream``, router/src/server.rs); the last event carries
    ``generated_text`` and, when the request set ``parameters.details``, ``StreamDetails``
    ``{"finish_reason": "length" | "eos_token" | "stop_sequence", "generated_tokens", "seed",
    "input_length"}``. An end by EOS is the EOS token itself, ``special: true``. Errors are
    ``ErrorResponse`` ``{"error", "error_type"}``; ``GET /info`` is ``Info`` (a subset here).
    The events are written ``data:`` with no space, as axum's ``Event`` writes them.

    Where the fake differs: ``token.id`` is the token's position, not a vocabulary id;
    ``logprob`` is a constant; ``top_tokens`` is never sent (TGI omits it unless the request
    sets ``top_n_tokens``); ``details.seed`` is null (TGI gives the seed it sampled with).
    TGI's Messages API (``POST /v1/chat/completions``, OpenAI's chunk shape:
    ``ChatCompletionChunk`` in router/src/lib.rs, with ``role`` in every delta and an EOS end
    reported as ``"stop"`` by ``FinishReason::format``) is not imitated by this dialect.
    """

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
        """The last event's end, with ``details`` only when the request asked for them
        (``StreamDetails`` in router/src/lib.rs)."""
        if not s.body["parameters"].get("details"):
            return {"generated_text": "".join(toks)}
        details = {
            "finish_reason": reason,
            "generated_tokens": len(toks),
            "seed": None,
            "input_length": prompt_tokens(s.body["inputs"]),
        }
        return {"generated_text": "".join(toks), "details": details}

    def token(self, fake: FakeEngine, s: Seen, i: int, text: str, last: bool, eos: bool) -> bytes:
        if last and not eos:  # the last token's event carries the end
            return self._event(i, text, False, self._end(s, s.toks, "length"))
        return self._event(i, text, False, None)

    def final(self, fake: FakeEngine, s: Seen, toks: list[str], eos: bool) -> bytes:
        if not eos:
            return b""
        return self._event(len(toks), "</s>", True, self._end(s, toks, "eos_token"))

    def error(self, fake: FakeEngine, message: str) -> bytes:
        return sse({"error": message, "error_type": "generation"}, b"data:")


class Triton(Dialect):
    """Triton's generate extension, which no CPU build lets us run here.

    Imitated from triton-inference-server/server docs/protocol/extension_generate.md:
    ``POST /v2/models/{model}/generate_stream`` with ``{"text_input", "parameters"}`` (the
    parameters are model-specific; ours are the TensorRT-LLM ensemble's names ``max_tokens``,
    ``random_seed``, ``stream``); each SSE ``data:`` is ``{"model_name", "model_version",
    "text_output"}``, an error ``{"error": "<message>"}`` (also after a 200 has begun the
    stream). Readiness is KServe v2's ``GET /v2/health/ready`` and
    ``GET /v2/models/{model}/ready`` (docs/protocol/ in the same repository); ``GET /v2``
    gives ``name``, ``version`` and ``extensions``.

    Where the fake differs: ``text_output`` is one token's text per event, as the TensorRT-LLM
    ensemble streams it (a backend may instead send the text so far); the stream ends with no
    finish reason, as Triton's does; ``num_input_tokens`` is sent only when the request sets
    ``return_num_input_tokens`` (an optional input of triton-inference-server/vllm_backend's
    src/model.py); model versions are not routed (``/versions/N`` is a 404 here).
    """

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
        obj: dict[str, Any] = {"model_name": MODEL, "model_version": "1", "text_output": text}
        if s.body.get("return_num_input_tokens"):  # the vLLM backend's optional input
            obj["num_input_tokens"] = prompt_tokens(s.body["text_input"])
        return sse(obj)

    def error(self, fake: FakeEngine, message: str) -> bytes:
        return sse({"error": message})


DIALECTS: dict[str, Dialect] = {
    "llamacpp": LlamaCpp(),
    "openai": OpenAI(),
    "tgi": Tgi(),
    "triton": Triton(),
}
