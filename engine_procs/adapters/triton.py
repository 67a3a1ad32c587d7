"""NVIDIA Triton Inference Server, generate extension:
``POST /v2/models/{model}/generate_stream``.

Wire format (docs/protocol/extension_generate.md in triton-inference-server/server): request
``{"text_input": ..., "parameters": {...}}`` where parameters are model-specific (we send
``stream``, ``max_tokens``, ``random_seed`` as the TensorRT-LLM ensemble names them, and
``temperature`` / ``top_p`` when set); each SSE ``data:`` event is
``{"model_name", "model_version", "text_output"}``. An error, before or during the stream, is
``{"error": "..."}``. Triton gives no finish reason: the stream simply ends, so the reason is
``length`` when ``max_tokens`` pieces came, else ``stop``. Readiness is
``GET /v2/health/ready`` and ``GET /v2/models/{model}/ready``; ``GET /v2`` gives the server
``version``. ``endpoint.model`` is required.

Triton itself says nothing of the prompt's length, nor does the TensorRT-LLM ensemble by
default. A model that returns the output ``num_input_tokens`` (the vLLM backend's, when the
request sets its optional input ``return_num_input_tokens``: triton-inference-server/
vllm_backend src/model.py) has it reported. We do not ask for it: a model without that input
would refuse the request.

No chats: the generate extension takes one ``text_input`` and Triton applies no chat template
(that is the model's business, and a TensorRT-LLM ensemble has none), so ``chat`` is False;
orchd refuses a chat for a Triton pool before it gets here, and a chat that reaches this
adapter anyway fails with ``INVALID_PARAMS`` naming it. No embeddings, and no stop strings
(their parameter is model-specific: TensorRT-LLM's ``stop_words``, vLLM's ``stop``).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx

from engine_procs.adapters.base import EngineRequest, EngineSink
from engine_procs.adapters.http_base import (
    HttpAdapter,
    StreamState,
    as_count,
    engine_error,
    malformed,
    parse_json,
)
from orchd.config import Replica

U64_MASK = (1 << 64) - 1


class TritonAdapter(HttpAdapter):
    name = "triton"
    chat = False  # the base refuses a chat: INVALID_PARAMS naming this adapter
    embeddings = False

    def __init__(self, replica: Replica, engine_addr: str, sink: EngineSink) -> None:
        super().__init__(replica, engine_addr, sink)
        self._model_path = f"/v2/models/{quote(self.model, safe='')}"

    async def start(self, timeout_s: float) -> None:
        if not self.model:
            raise RuntimeError(
                f"replica {self.replica.id}: the triton adapter needs endpoint.model"
            )
        await super().start(timeout_s)

    def request(self, req: EngineRequest) -> tuple[str, dict[str, Any]]:
        params: dict[str, Any] = {
            "stream": True,
            "max_tokens": req.max_tokens,
            "random_seed": req.seed & U64_MASK,
        }
        if req.temperature is not None:
            params["temperature"] = req.temperature
        if req.top_p is not None:
            params["top_p"] = req.top_p
        body = {"text_input": req.prompt, "parameters": params}
        return f"{self._model_path}/generate_stream", body

    def on_event(self, name: str, data: str, st: StreamState) -> None:
        obj = parse_json(data)
        if not isinstance(obj, dict):
            raise malformed("not an object", data)
        if name == "error" or "error" in obj:
            raise engine_error(data)
        text = obj.get("text_output")
        if not isinstance(text, str):
            raise malformed("no text_output", data)
        if st.prompt_tokens is None:
            n = obj.get("num_input_tokens")  # a one-element tensor: a number or [number]
            st.prompt_tokens = as_count(n[0] if isinstance(n, list) and len(n) == 1 else n)
        st.emit(text)
        # The stream's end (EOF) is the finish; decide the reason now, it holds until then.
        st.finish = st.length_or_stop()

    async def probe(self, client: httpx.AsyncClient) -> bool:
        if (await client.get("/v2/health/ready")).status_code != 200:
            return False
        return (await client.get(f"{self._model_path}/ready")).status_code == 200

    async def describe(self, client: httpx.AsyncClient) -> None:
        resp = await client.get("/v2")
        if resp.status_code == 200:
            version = resp.json().get("version")
            if isinstance(version, str) and version:
                self.engine_version = version
