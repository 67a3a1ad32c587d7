"""The OpenAI-compatible streaming API, as served by vLLM, SGLang, llama-server and Ollama.

``POST /v1/completions`` (or ``/v1/chat/completions`` with ``endpoint.chat``) with
``stream: true``: SSE ``data: {...}`` chunks whose ``choices[0].text`` (chat:
``choices[0].delta.content``) is the next piece of text and whose ``finish_reason`` turns
``"length"`` or ``"stop"`` at the end, then ``data: [DONE]``. An error inside the stream is a
chunk ``{"error": {...}}``. Readiness is ``GET /health`` (vLLM, SGLang, llama-server), else
``GET /v1/models`` (Ollama has no /health). The model name comes from the config or the first
entry of ``/v1/models`` (whose vLLM entries carry ``max_model_len``); the version from vLLM's
``GET /version`` or Ollama's ``GET /api/version``, else "unknown".

The prompt's length: we ask for ``stream_options: {"include_usage": true}`` (OpenAI's API
reference; vLLM's ``StreamOptions`` in vllm/entrypoints/openai/protocol.py; SGLang,
llama-server and Ollama take it too). Every chunk then has ``"usage": null``, and one more
chunk before ``[DONE]`` has ``"choices": []`` and ``"usage": {"prompt_tokens",
"completion_tokens", "total_tokens"}``. An engine that ignores the option reports nothing.
"""

from __future__ import annotations

from typing import Any

import httpx

from engine_procs.adapters.base import EngineRequest
from engine_procs.adapters.http_base import (
    HttpAdapter,
    StreamState,
    as_count,
    as_int,
    engine_error,
    malformed,
    parse_json,
)

I64_MAX = (1 << 63) - 1  # vLLM validates seed as a signed 64-bit integer


class OpenAIAdapter(HttpAdapter):
    name = "openai"

    def request(self, req: EngineRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": req.max_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},  # the prompt's length, at the end
            "seed": req.seed & I64_MAX,
        }
        if self.replica.endpoint.chat:
            body["messages"] = [{"role": "user", "content": req.prompt}]
            path = "/v1/chat/completions"
        else:
            body["prompt"] = req.prompt
            path = "/v1/completions"
        if req.temperature is not None:
            body["temperature"] = req.temperature
        if req.top_p is not None:
            body["top_p"] = req.top_p
        return path, body

    def on_event(self, name: str, data: str, st: StreamState) -> None:
        if data == "[DONE]":
            if st.finish is None:
                st.finish = st.length_or_stop()
            st.done = True
            return
        if name == "error":
            raise engine_error(data)
        obj = parse_json(data)
        if not isinstance(obj, dict):
            raise malformed("not an object", data)
        if obj.get("error") is not None:
            raise engine_error(data)
        usage = obj.get("usage")
        if isinstance(usage, dict) and st.prompt_tokens is None:
            st.prompt_tokens = as_count(usage.get("prompt_tokens"))
        choices = obj.get("choices")
        if not isinstance(choices, list):
            raise malformed("no choices", data)
        for choice in choices:  # empty on a usage-only chunk
            if not isinstance(choice, dict):
                raise malformed("choice is not an object", data)
            if "delta" in choice:
                delta = choice["delta"]
                text = delta.get("content") if isinstance(delta, dict) else None
            else:
                text = choice.get("text")
            if text is not None and not isinstance(text, str):
                raise malformed("text is not a string", data)
            st.emit(text or "")
            reason = choice.get("finish_reason")
            if reason is not None:
                st.finish = "length" if reason == "length" else "stop"

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
