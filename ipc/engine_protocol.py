"""The engine protocol: what an engine process (mock or torch) and its supervisor say
over their ZeroMQ PAIR socket. A union of its own, apart from the scheduler's messages (re-exported
by :mod:`ipc.protocol`)."""

from __future__ import annotations

import msgspec


class _Msg(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    pass


class EngSubmit(_Msg):
    rid: int
    prompt: str
    seed: int
    max_tokens: int
    temperature: float | None = None  # None: the engine's default (greedy for torch)
    top_p: float | None = None
    messages: list[tuple[str, str]] | None = None  # a chat: rendered with the chat template
    workload: str = "completion"  # or "embedding": answered with EngEmbedding
    inputs: list[str] | None = None  # the texts to embed


class EngEmbedding(_Msg):
    """An embedding request's result: one vector per input, and the tokens it read."""

    rid: int
    vectors: list[list[float]]
    prompt_tokens: int = 0


class EngAbort(_Msg):
    rid: int


class EngStep(_Msg):
    """One engine step: new token ids per request, and the requests that finished."""

    tokens: list[tuple[int, list[int]]]
    finished: list[tuple[int, str]] = []  # (rid, reason)
    errors: list[tuple[int, str]] = []  # (rid, message)
    t_ns: int = 0  # CLOCK_MONOTONIC when the engine emitted the step
    # (rid, prompt length in the engine's tokens), in the first step that carries a request;
    # the adapter reports these before the step's tokens, finishes and errors.
    prompts: list[tuple[int, int]] = []


class EngTextStep(_Msg):
    """One step of an engine that detokenizes itself (torch): text pieces, one per token."""

    tokens: list[tuple[int, list[str]]]
    finished: list[tuple[int, str]] = []
    errors: list[tuple[int, str]] = []
    t_ns: int = 0
    prompts: list[tuple[int, int]] = []  # as in EngStep


class EngReady(_Msg):
    engine_version: str
    vocab_size: int
    pid: int


EngineMessage = EngSubmit | EngAbort | EngStep | EngTextStep | EngReady | EngEmbedding

_eng_decoder = msgspec.msgpack.Decoder(EngineMessage)


def decode_engine(data: bytes) -> EngineMessage:
    return _eng_decoder.decode(data)
