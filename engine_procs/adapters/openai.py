"""The OpenAI-compatible API, as served by vLLM, SGLang, llama-server and Ollama.

Completions: ``POST /v1/completions`` (or ``/v1/chat/completions`` with ``endpoint.chat``, the
prompt as one user message) with ``stream: true``: SSE ``data: {...}`` chunks whose
``choices[0].text`` (chat: ``choices[0].delta.content``) is the next piece of text and whose
``finish_reason`` turns ``"length"`` or ``"stop"`` at the end, then ``data: [DONE]``
(:func:`~engine_procs.adapters.http_base.openai_chunk`). An error inside the stream is a chunk
``{"error": {...}}``. Readiness is ``GET /health`` (vLLM, SGLang, llama-server), else
``GET /v1/models`` (Ollama has no /health). The model name comes from the config or the first
entry of ``/v1/models`` (whose vLLM entries carry ``max_model_len``); the version from vLLM's
``GET /version`` or Ollama's ``GET /api/version``, else "unknown".

Chats (``EngineRequest.messages``): ``POST /v1/chat/completions`` with ``messages`` (OpenAI's
Chat Completions reference; vLLM's ``ChatCompletionRequest`` in
vllm/entrypoints/openai/protocol.py), rendered by the server with the model's chat template;
the stream is the chat chunk shape above (a first delta with only the ``role``, the pieces,
then a chunk with an empty delta and the ``finish_reason``). Stop strings go as ``stop`` in
both APIs.

The prompt's length: we ask for ``stream_options: {"include_usage": true}`` (OpenAI's API
reference; vLLM's ``StreamOptions`` in vllm/entrypoints/openai/protocol.py; SGLang,
llama-server and Ollama take it too). Every chunk then has ``"usage": null``, and one more
chunk before ``[DONE]`` has ``"choices": []`` and ``"usage": {"prompt_tokens",
"completion_tokens", "total_tokens"}``. An engine that ignores the option reports nothing.

Embeddings: ``POST /v1/embeddings`` with ``model`` and ``input`` (a list of strings) and
``encoding_format: "float"``; the answer (OpenAI's Embeddings reference; vLLM's
``EmbeddingResponse``) is ``{"object": "list", "data": [{"object": "embedding", "index": i,
"embedding": [floats]}], "usage": {"prompt_tokens", "total_tokens"}}``. The vectors are
handed over ordered by ``index``, one per input, and ``usage.prompt_tokens`` as the tokens read.
"""

from __future__ import annotations

from typing import Any

import httpx

from engine_procs.adapters.base import EngineRequest
from engine_procs.adapters.http_base import (
    HttpAdapter,
    StreamFailure,
    StreamState,
    as_count,
    as_int,
    chat_messages,
    openai_chunk,
)
from orchd.core.errors import Code

I64_MAX = (1 << 63) - 1  # vLLM validates seed as a signed 64-bit integer


class OpenAIAdapter(HttpAdapter):
    name = "openai"
    chat = True
    embeddings = True

    def request(self, req: EngineRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": req.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},  # the prompt's length, at the end
            "seed": req.seed & I64_MAX,
        }
        if req.messages is not None:
            body["messages"] = chat_messages(req)
            path = "/v1/chat/completions"
        elif self.replica.endpoint.chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = req.prompt
            path = "/v1/completions"
        if req.temperature is not None:
            body["temperature"] = req.temperature
        if req.top_p is not None:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = list(req.stop)
        return path, body

    def on_event(self, name: str, data: str, st: StreamState) -> None:
        openai_chunk(name, data, st)

    def embed_request(self, req: EngineRequest) -> tuple[str, dict[str, Any]]:
        body = {"model": self.model, "input": list(req.inputs or []), "encoding_format": "float"}
        return "/v1/embeddings", body

    def read_embedding(self, obj: Any, req: EngineRequest) -> tuple[list[list[float]], int | None]:
        return read_openai_embeddings(obj, len(req.inputs or []))

    async def probe(self, client: httpx.AsyncClient) -> bool:
        status = (await client.get("/health")).status_code
        if status == 200:
            return True
        if status in (404, 405):
            return (await client.get("/v1/models")).status_code == 200
        return False

    async def describe(self, client: httpx.AsyncClient) -> None:
        resp = await client.get("/v1/models")
        if resp.status_code == 200:
            data = resp.json().get("data") or []
            entry = next((m for m in data if m.get("id") == self.model), data[0] if data else {})
            if not self.model and isinstance(entry.get("id"), str):
                self.model = entry["id"]
            self.ctx_max = as_int(entry.get("max_model_len"))
        for path in ("/version", "/api/version"):
            resp = await client.get(path)
            if resp.status_code == 200:
                version = resp.json().get("version")
                if isinstance(version, str) and version:
                    self.engine_version = version
                    return


def read_openai_embeddings(obj: Any, n_inputs: int) -> tuple[list[list[float]], int | None]:
    """An OpenAI embeddings answer: ``n_inputs`` float vectors ordered by ``index``, and
    ``usage.prompt_tokens`` where it is given."""

    def bad(what: str) -> StreamFailure:
        return StreamFailure(Code.INTERNAL, f"malformed engine embeddings answer: {what}")

    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, list):
        raise bad("no data list")
    by_index: dict[int, list[float]] = {}
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(index, int) or not isinstance(vector, list):
            raise bad("an item without index and embedding")
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
            raise bad(f"embedding {index} is not a list of numbers")
        by_index[index] = [float(x) for x in vector]
    if sorted(by_index) != list(range(n_inputs)):
        raise bad(f"{n_inputs} inputs, vectors for indices {sorted(by_index)}")
    usage = obj.get("usage")
    tokens = as_count(usage.get("prompt_tokens")) if isinstance(usage, dict) else None
    return [by_index[i] for i in range(n_inputs)], tokens
