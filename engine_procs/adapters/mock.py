"""Adapter for the mock engine process (``engine_procs/mock_engine.py``). Chats are rendered by
the engine with its documented template; embeddings come back as one ``EngEmbedding``, which
the base reports (usage, then the vectors)."""

from __future__ import annotations

import msgspec

from engine_procs.adapters.base import EngineSink
from engine_procs.adapters.pair import EngineProcessAdapter
from engine_procs.mock_engine import vocab
from ipc import protocol as p
from ipc.frames import json_string
from orchd.config import Replica


class MockAdapter(EngineProcessAdapter):
    name = "mock"
    chat = True  # rendered with the mock's own template (mock_engine.render_chat)
    embeddings = True  # deterministic unit vectors (mock_engine.embed)
    module = "engine_procs.mock_engine"

    def __init__(self, replica: Replica, engine_addr: str, sink: EngineSink) -> None:
        super().__init__(replica, engine_addr, sink)
        self._vocab_json = [json_string(w) for w in vocab(replica.mock.vocab_size)]

    def engine_config_json(self) -> str:
        return msgspec.json.encode(self.replica.mock).decode()

    def on_step(self, msg: p.EngineMessage) -> None:
        if not isinstance(msg, p.EngStep):
            return
        sink, vj = self.sink, self._vocab_json
        for rid, n in msg.prompts:
            sink.on_usage(rid, n)
        if self.replica.mock.stamp_tokens:
            stamp = json_string(str(msg.t_ns))
            for rid, toks in msg.tokens:
                sink.on_tokens(rid, [stamp] * len(toks))
        else:
            for rid, toks in msg.tokens:
                sink.on_tokens(rid, [vj[t] for t in toks])
        for rid, reason in msg.finished:
            sink.on_finish(rid, reason)
        for rid, message in msg.errors:
            sink.on_error(rid, "INTERNAL", message)
