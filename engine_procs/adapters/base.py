"""The adapter interface every engine speaks through, and the sink it reports into.

An adapter owns one engine (a process it starts, or a server it talks to). The supervisor
submits and aborts requests; the adapter reports tokens, ends and failures to the sink as
they happen. Token texts are handed over already JSON-encoded, so nothing re-encodes them.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Protocol

from orchd.config import Replica


@dataclass(slots=True)
class EngineRequest:
    rid: int
    prompt: str
    seed: int
    max_tokens: int
    # Sampling overrides; None leaves the engine's own default.
    temperature: float | None = None
    top_p: float | None = None
    # A chat: (role, content) turns the engine renders with its own chat template (the
    # prompt is then empty). Only for adapters whose ``chat`` is True.
    messages: list[tuple[str, str]] | None = None
    # Stop strings, for engines that take them (orchd also cuts the stream itself).
    stop: list[str] | None = None
    # "completion" (tokens) or "embedding" (one vector per input, to on_embedding); only
    # adapters whose ``embeddings`` is True get "embedding".
    workload: str = "completion"
    inputs: list[str] | None = None  # the texts to embed


class EngineSink(Protocol):
    def on_tokens(self, rid: int, texts_json: list[bytes]) -> None: ...

    def on_finish(self, rid: int, reason: str) -> None: ...

    def on_error(
        self, rid: int, code: str, message: str, retry_after_ms: int | None = None
    ) -> None: ...

    def on_usage(self, rid: int, prompt_tokens: int) -> None:
        """The request's prompt length in the engine's own tokens, once the engine says it
        (any time before the request's finish or error)."""

    def on_embedding(self, rid: int, vectors: list[list[float]]) -> None:
        """An embedding request's result, one vector per input, in order; it ends the
        request (no finish follows). ``on_usage`` may come before it."""

    def on_engine_dead(self, reason: str) -> None: ...

    def flush(self) -> None: ...


class EngineAdapter(abc.ABC):
    name: str = ""
    # What the engine can do beyond completions (orchd refuses the rest with a clear 400;
    # orchd/config.py names the same adapters in CHAT_ADAPTERS and EMBEDDING_ADAPTERS).
    chat: bool = False
    embeddings: bool = False

    def __init__(self, replica: Replica, engine_addr: str, sink: EngineSink) -> None:
        self.replica = replica
        self.engine_addr = engine_addr
        self.sink = sink
        self.engine_version = ""
        self.paused = False  # set by the supervisor while its rings are backed up

    @abc.abstractmethod
    async def start(self, timeout_s: float) -> None:
        """Start (or connect to) the engine and return once it serves; raise on failure."""

    @abc.abstractmethod
    def submit(self, req: EngineRequest) -> None:
        """Begin a request; its events arrive through the sink, never before this returns."""

    @abc.abstractmethod
    def abort(self, rid: int) -> None:
        """Stop a request: the engine frees its slot and no further event comes for it."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Stop the engine (or disconnect) and release everything."""

    def can_reload(self) -> bool:
        """Whether this adapter can bring up its engine on another model (a reload). An
        engine orchd only connects to, and does not start, cannot."""
        return True

    def resume(self) -> None:
        """Called when the supervisor's rings have room again after ``paused`` was set."""
        self.paused = False

    def engine_pid(self) -> int | None:
        return None
