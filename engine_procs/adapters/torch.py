"""Adapter for the built-in torch engine process (``engine_procs/torch_engine.py``).

It needs the ``torch`` extra (torch and transformers) only in the engine process, which
imports them; the supervisor never does. Chats and embeddings are the engine's (see
``engine_procs/torch_engine.py``); a step's error is ``INVALID_PARAMS`` when the engine marks
it the request's own fault (``engine_link.INVALID_PREFIX``), else ``INTERNAL``."""

from __future__ import annotations

import msgspec

from engine_procs import engine_link
from engine_procs.adapters.pair import EngineProcessAdapter
from ipc import protocol as p
from ipc.frames import json_string


class TorchAdapter(EngineProcessAdapter):
    name = "torch"
    chat = True  # the tokenizer's chat template (a default one where the model has none)
    embeddings = True  # mean-pooled, L2-normalised last hidden states
    module = "engine_procs.torch_engine"

    def engine_config_json(self) -> str:
        return msgspec.json.encode(self.replica.torch).decode()

    def on_step(self, msg: p.EngineMessage) -> None:
        if not isinstance(msg, p.EngTextStep):
            return
        sink = self.sink
        for rid, n in msg.prompts:
            sink.on_usage(rid, n)
        for rid, pieces in msg.tokens:
            sink.on_tokens(rid, [json_string(t) for t in pieces])
        for rid, reason in msg.finished:
            sink.on_finish(rid, reason)
        for rid, message in msg.errors:
            sink.on_error(rid, engine_link.error_code(message), message)
