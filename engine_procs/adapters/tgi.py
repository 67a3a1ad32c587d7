"""Hugging Face text-generation-inference: completions on ``POST /generate_stream``; chats on
its Messages API, ``POST /v1/chat/completions``.

Wire format (docs/openapi.json in huggingface/text-generation-inference): request
``{"inputs": ..., "parameters": {"max_new_tokens", "seed", "do_sample", "temperature",
"top_p", "details"}}``; each SSE event is a ``StreamResponse``
``{"index", "token": {"id", "text", "logprob", "special"}, "generated_text": null,
"details": null}``, the last one with ``generated_text`` and ``details.finish_reason``
(``length`` | ``eos_token`` | ``stop_sequence``). An error inside the stream is
``{"error": ..., "error_type": ...}``. ``GET /health`` is 200 when serving; ``GET /info``
gives ``version``, ``model_id``, ``max_total_tokens`` and ``max_concurrent_requests``.
Special tokens (e.g. ``</s>``) are not text and are not forwarded.

The prompt's length is the last event's ``details.input_length`` (``StreamDetails`` in
router/src/lib.rs, filled in by ``generate_stream`` in router/src/server.rs when the request
asks for ``details``, as we do), in TGI's tokens after its own truncation. Releases older
than that field say nothing of the prompt in a stream (``details.prefill`` needs
``decoder_input_details``, which a stream refuses: ``PrefillDetailsStream`` in
router/src/validation.rs); then no prompt length is reported. Stop strings go as
``parameters.stop`` (at most ``max_stop_sequences``, TGI's own limit).

A chat goes to the Messages API (docs/source/messages_api.md; ``ChatRequest`` in
router/src/lib.rs): ``{"model", "messages", "max_tokens", "seed", "stop", "stream": true,
"stream_options": {"include_usage": true}, "temperature", "top_p"}``, rendered by TGI with the
model's chat template. Temperature 0 there means greedy (``ChatRequest::try_into_generate``:
``Some(0.0) => do_sample false``), so it is passed as given; ``top_p`` only inside (0, 1), as
for /generate_stream. The stream has OpenAI's chunk shape (``ChatState::push`` in
router/src/chat.rs): one chunk per token with ``choices[0].delta {"role": "assistant",
"content"}`` (an EOS token's content is empty), the last one with ``finish_reason``
(``FinishReason::format(true)``: ``"length"``, ``"stop"`` at EOS, ``"stop_sequence"``; all but
``"length"`` are a stop), then with ``include_usage`` a ``"choices": []`` chunk whose
``usage.prompt_tokens`` is the prompt's length, then ``data: [DONE]``. TGI serves no
embeddings (that is text-embeddings-inference, another server).
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
    chat_messages,
    engine_error,
    malformed,
    openai_chunk,
    parse_json,
)

U64_MASK = (1 << 64) - 1


class TgiAdapter(HttpAdapter):
    name = "tgi"
    chat = True

    def request(self, req: EngineRequest) -> tuple[str, dict[str, Any]]:
        if req.messages is not None:
            return "/v1/chat/completions", self._chat_body(req)
        params: dict[str, Any] = {
            "max_new_tokens": req.max_tokens,
            "seed": (req.seed & U64_MASK) or 1,  # TGI wants a positive seed
            "details": True,
        }
        if req.temperature is not None and req.temperature > 0:
            params["temperature"] = req.temperature  # TGI rejects temperature 0
            params["do_sample"] = True
        if req.top_p is not None and 0 < req.top_p < 1:
            params["top_p"] = req.top_p
            params["do_sample"] = True
        if req.stop:
            params["stop"] = list(req.stop)
        return "/generate_stream", {"inputs": req.prompt, "parameters": params}

    def _chat_body(self, req: EngineRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model or "tgi",  # unused by TGI, required by its schema
            "messages": chat_messages(req),
            "max_tokens": req.max_tokens,
            "seed": (req.seed & U64_MASK) or 1,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if req.temperature is not None:
            body["temperature"] = req.temperature  # 0: greedy (see the module docstring)
        if req.top_p is not None and 0 < req.top_p < 1:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = list(req.stop)
        return body

    def on_event(self, name: str, data: str, st: StreamState) -> None:
        if st.req.messages is not None:
            openai_chunk(name, data, st)
            return
        obj = parse_json(data)
        if not isinstance(obj, dict):
            raise malformed("not an object", data)
        if name == "error" or "error" in obj:
            raise engine_error(data)
        token = obj.get("token")
        if not isinstance(token, dict) or not isinstance(token.get("text"), str):
            raise malformed("no token.text", data)
        if not token.get("special"):
            st.emit(token["text"])
        details = obj.get("details")
        if obj.get("generated_text") is not None or details is not None:
            reason = details.get("finish_reason") if isinstance(details, dict) else None
            if isinstance(details, dict):
                st.prompt_tokens = as_count(details.get("input_length"))
            if reason is None:
                st.finish = st.length_or_stop()
            else:
                st.finish = "length" if reason == "length" else "stop"
            st.done = True

    async def probe(self, client: httpx.AsyncClient) -> bool:
        return (await client.get("/health")).status_code == 200

    async def describe(self, client: httpx.AsyncClient) -> None:
        resp = await client.get("/info")
        if resp.status_code != 200:
            return
        info = resp.json()
        version = info.get("version")
        if isinstance(version, str) and version:
            self.engine_version = version
        if not self.model and isinstance(info.get("model_id"), str):
            self.model = info["model_id"]
        self.ctx_max = as_int(info.get("max_total_tokens"))
        self.slots = as_int(info.get("max_concurrent_requests"))
