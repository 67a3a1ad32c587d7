"""llama.cpp's ``llama-server``: completions on its native API, ``POST /completion`` with
``stream: true``; chats on its OpenAI-compatible ``POST /v1/chat/completions``.

Wire format (tools/server/README.md in ggml-org/llama.cpp): each SSE ``data:`` event is
``{"content": "...", "stop": false, ...}``; the last has ``"stop": true`` with
``stop_type`` (``eos`` | ``limit`` | ``word``; older builds: ``stopped_eos`` /
``stopped_limit`` / ``stopped_word``), ``tokens_predicted`` and ``timings``. Errors inside a
stream arrive as an ``error: {...}`` line. ``GET /health`` is 503 while the model loads, 200
once it serves; ``GET /props`` gives ``build_info``, ``total_slots`` and
``default_generation_settings.n_ctx``. The seed is a uint32 where 0xFFFFFFFF means random.

The prompt's length is ``tokens_evaluated`` ("total number of tokens evaluated from the
prompt", the README's /completion response), which current servers put in every event
(``server_task_result_cmpl_partial::to_json_non_oaicompat`` and the final result's JSON in
tools/server/server-task.cpp). A final event without it still has ``timings``: ``prompt_n``
(the prompt tokens computed) plus ``cache_n`` (those taken from the prompt cache; builds
without ``cache_n`` leave a cached prefix uncounted). Stop strings go as ``stop``.

A chat goes to ``POST /v1/chat/completions`` with ``messages``, ``max_tokens``, ``seed``,
``stop`` and ``stream_options.include_usage`` (tools/server/README.md, "OpenAI-compatible Chat
Completions API"), rendered by the server with the model's chat template. Its stream has
OpenAI's chunk shape (``server_task_result_cmpl_partial::to_json_oaicompat_chat`` and
``server_task_result_cmpl_final::to_json_oaicompat_chat_stream`` in
tools/server/server-task.cpp): a first delta ``{"role": "assistant", "content": null}``, the
pieces as ``choices[0].delta.content``, a chunk with an empty delta and ``finish_reason``
(``"length"``, or ``"stop"`` at an EOS or stop word), then, as asked, a ``"choices": []`` chunk
with ``usage.prompt_tokens``, then ``data: [DONE]`` (older builds put ``usage`` in the
finish chunk itself; both are read). An error is the same ``error: {...}`` line.
llama-server's own ``/embedding`` needs a server started with ``--embeddings`` and is not used:
this adapter serves no embeddings.
"""

from __future__ import annotations

from typing import Any

import httpx

from engine_procs.adapters.base import EngineRequest
from engine_procs.adapters.http_base import (
    U32_RANDOM,
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


class LlamaCppAdapter(HttpAdapter):
    name = "llamacpp"
    chat = True

    def request(self, req: EngineRequest) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {
            "stream": True,
            "seed": req.seed % U32_RANDOM,  # never the "random" sentinel
        }
        if req.messages is not None:
            path = "/v1/chat/completions"
            body["messages"] = chat_messages(req)
            body["max_tokens"] = req.max_tokens
            body["stream_options"] = {"include_usage": True}
            if self.model:
                body["model"] = self.model
        else:
            path = "/completion"
            body["prompt"] = req.prompt
            body["n_predict"] = req.max_tokens
        if req.temperature is not None:
            body["temperature"] = req.temperature
        if req.top_p is not None:
            body["top_p"] = req.top_p
        if req.stop:
            body["stop"] = list(req.stop)
        return path, body

    def on_event(self, name: str, data: str, st: StreamState) -> None:
        if st.req.messages is not None:
            openai_chunk(name, data, st)
            return
        if name == "error":
            raise engine_error(data)
        obj = parse_json(data)
        if not isinstance(obj, dict):
            raise malformed("not an object", data)
        if "error" in obj:
            raise engine_error(data)
        content, stop = obj.get("content", ""), obj.get("stop")
        if not isinstance(content, str) or not isinstance(stop, bool):
            raise malformed("no content/stop", data)
        if st.prompt_tokens is None:
            st.prompt_tokens = _prompt_tokens(obj, stop)
        st.emit(content)
        if stop:
            st.finish = _reason(obj, st)
            st.done = True

    async def probe(self, client: httpx.AsyncClient) -> bool:
        return (await client.get("/health")).status_code == 200

    async def describe(self, client: httpx.AsyncClient) -> None:
        resp = await client.get("/props")
        if resp.status_code != 200:
            return
        props = resp.json()
        build = props.get("build_info")
        if isinstance(build, str) and build:
            self.engine_version = build
        settings = props.get("default_generation_settings") or {}
        self.ctx_max = as_int(settings.get("n_ctx")) or as_int(props.get("n_ctx"))
        self.slots = as_int(props.get("total_slots"))
        alias = props.get("model_alias") or props.get("model_path")
        if not self.model and isinstance(alias, str):
            self.model = alias


def _prompt_tokens(obj: dict[str, Any], final: bool) -> int | None:
    n = as_count(obj.get("tokens_evaluated"))
    timings = obj.get("timings")
    if n is None and final and isinstance(timings, dict):
        computed = as_count(timings.get("prompt_n"))
        if computed is not None:
            n = computed + (as_count(timings.get("cache_n")) or 0)
    return n


def _reason(obj: dict[str, Any], st: StreamState) -> str:
    kind = obj.get("stop_type")
    if kind == "limit" or obj.get("stopped_limit") is True:
        return "length"
    if kind in ("eos", "word") or obj.get("stopped_eos") or obj.get("stopped_word"):
        return "stop"
    return st.length_or_stop()
