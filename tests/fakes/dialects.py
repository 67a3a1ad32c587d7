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


def render_chat(messages: list[dict[str, str]]) -> str:
    """The fakes' chat template (what a real server does with the model's own): each turn as
    ``role: content`` on its own line, then ``assistant:``. The rendered text is the prompt."""
    return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


EMBEDDING_DIM = 8


def embedding_for(text: str) -> list[float]:
    """The fake embedding model's vector for ``text`` (seeded by it, nothing else)."""
    rng = random.Random(f"embedding\0{text}")
    return [round(rng.uniform(-1.0, 1.0), 6) for _ in range(EMBEDDING_DIM)]


def chat_chunk(
    choices: list[dict[str, Any]], usage: dict[str, int] | None = None, **extra: Any
) -> dict[str, Any]:
    """An OpenAI ``chat.completion.chunk`` (the fields every chat server here writes)."""
    obj: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": choices,
        **extra,
    }
    if usage is not None:
        obj["usage"] = usage
    return obj


def usage_of(s: Seen, prompt: str) -> dict[str, int]:
    n, done = prompt_tokens(prompt), len(s.toks)
    return {"prompt_tokens": n, "completion_tokens": done, "total_tokens": n + done}


def usage_asked(s: Seen) -> bool:
    options = s.body.get("stream_options") or {}
    return bool(options.get("include_usage"))


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

    def is_embed(self, path: str) -> bool:
        return False

    def embed(self, fake: FakeEngine, body: dict[str, Any]) -> tuple[int, Any]:
        raise AssertionError(f"the {type(self).__name__} fake serves no embeddings")


class LlamaCpp(Dialect):
    """``/completion`` (native) and ``/v1/chat/completions`` (OpenAI chunks, as
    tools/server/server-task.cpp writes them)."""

    def is_generate(self, path: str) -> bool:
        return path in ("/completion", "/v1/chat/completions")

    def params(self, body: dict[str, Any]) -> tuple[str, int, int]:
        if "messages" in body:
            return render_chat(body["messages"]), body["seed"], body["max_tokens"]
        return body["prompt"], body["seed"], body["n_predict"]

    def _chat(self, fake: FakeEngine, delta: dict[str, Any], reason: str | None) -> dict[str, Any]:
        choice = {"finish_reason": reason, "index": 0, "delta": delta}
        return chat_chunk([choice], system_fingerprint=f"b{fake.version}")

    def _timings(self, s: Seen) -> dict[str, Any]:
        n = prompt_tokens(self.params(s.body)[0])
        return {"cache_n": 0, "prompt_n": n, "prompt_ms": 1.0, "predicted_n": len(s.toks)}

    def _chat_token(self, fake: FakeEngine, s: Seen, i: int, text: str) -> bytes:
        out = b""
        if i == 0:  # "an initial update to conform to openai behavior"
            out = sse(self._chat(fake, {"role": "assistant", "content": None}, None))
        return out + sse(self._chat(fake, {"content": text}, None))

    def _chat_final(self, fake: FakeEngine, s: Seen, eos: bool) -> bytes:
        chunks = [self._chat(fake, {}, "stop" if eos else "length")]
        if usage_asked(s):
            usage = usage_of(s, self.params(s.body)[0])
            chunks.append(chat_chunk([], usage, system_fingerprint=f"b{fake.version}"))
        chunks[-1]["timings"] = self._timings(s)
        return b"".join(sse(c) for c in chunks) + b"data: [DONE]\n\n"

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
        if "messages" in s.body:
            return self._chat_token(fake, s, i, text)
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
        if "messages" in s.body:
            return self._chat_final(fake, s, eos)
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
    """vLLM's OpenAI-compatible server: completions, chat completions, embeddings."""

    def is_generate(self, path: str) -> bool:
        return path in ("/v1/completions", "/v1/chat/completions")

    def params(self, body: dict[str, Any]) -> tuple[str, int, int]:
        prompt = body["prompt"] if "prompt" in body else render_chat(body["messages"])
        return prompt, body["seed"], body["max_tokens"]

    def is_embed(self, path: str) -> bool:
        return path == "/v1/embeddings"

    def embed(self, fake: FakeEngine, body: dict[str, Any]) -> tuple[int, Any]:
        """vLLM's ``EmbeddingResponse`` (serving_embedding.py); a 400 as vLLM's
        ``ErrorResponse`` for an input it cannot take."""
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not isinstance(inputs, list) or not inputs or body.get("model") != MODEL:
            err = {
                "object": "error",
                "message": "bad embeddings request",
                "type": "BadRequestError",
            }
            return 400, {**err, "param": None, "code": 400}
        n = sum(prompt_tokens(t) for t in inputs)
        data = [
            {"index": i, "object": "embedding", "embedding": embedding_for(t)}
            for i, t in enumerate(inputs)
        ]
        return 200, {
            "id": "embd-fake",
            "object": "list",
            "created": 1700000000,
            "model": MODEL,
            "data": data,
            "usage": {"prompt_tokens": n, "total_tokens": n, "completion_tokens": 0},
        }

    def get(self, fake: FakeEngine, path: str) -> tuple[int, Any]:
        if path == "/health":
            return (503, b"") if fake.loading else (200, b"")
        if path == "/v1/models":
            model = {"id": MODEL, "object": "model", "owned_by": "vllm", "root": MODEL}
            return 200, {"object": "list", "data": [{**model, "max_model_len": fake.n_ctx}]}
        if path == "/version":
            return 200, {"version": fake.version}
        return 404, {"detail": "Not Found"}

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
        elif usage_asked(s):
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
        if usage_asked(s):
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
    TGI's Messages API (``POST /v1/chat/completions``) is imitated too: OpenAI's chunk shape,
    as ``ChatState::push`` in router/src/chat.rs writes it (``ChatCompletionChunk`` in
    router/src/lib.rs, ``role`` in every delta, an EOS end reported as ``"stop"`` by
    ``FinishReason::format``).
    """

    def is_generate(self, path: str) -> bool:
        return path in ("/generate_stream", "/v1/chat/completions")

    def params(self, body: dict[str, Any]) -> tuple[str, int, int]:
        if "messages" in body:
            return render_chat(body["messages"]), body["seed"], body["max_tokens"]
        p = body["parameters"]
        return body["inputs"], p["seed"], p["max_new_tokens"]

    def _chat(self, fake: FakeEngine, text: str, reason: str | None) -> bytes:
        delta = {"role": "assistant", "content": text}
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        fingerprint = f"{fake.version}-native"
        return sse(
            chat_chunk([choice], id="", system_fingerprint=fingerprint, usage=None), b"data:"
        )

    def _chat_end(self, fake: FakeEngine, s: Seen, text: str, reason: str) -> bytes:
        """The last token's chunk with its finish reason, the usage chunk if asked, [DONE]."""
        out = self._chat(fake, text, reason)
        if usage_asked(s):
            usage = usage_of(s, self.params(s.body)[0])
            fingerprint = f"{fake.version}-native"
            out += sse(chat_chunk([], usage, id="", system_fingerprint=fingerprint), b"data:")
        return out + b"data:[DONE]\n\n"

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
        if "messages" in s.body:
            if last and not eos:
                return self._chat_end(fake, s, text, "length")
            return self._chat(fake, text, None)
        if last and not eos:  # the last token's event carries the end
            return self._event(i, text, False, self._end(s, s.toks, "length"))
        return self._event(i, text, False, None)

    def final(self, fake: FakeEngine, s: Seen, toks: list[str], eos: bool) -> bytes:
        if not eos:
            return b""
        if "messages" in s.body:  # the EOS token: special, so no text; OpenAI's "stop"
            return self._chat_end(fake, s, "", "stop")
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
