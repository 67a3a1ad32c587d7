"""What the supervisor's core asks its shell to do: the effects of
:class:`engine_procs.supervisor_core.SupervisorCore`, carried out by
:class:`engine_procs.supervisor.Supervisor` in the order they come."""

from __future__ import annotations

from typing import Any, NamedTuple

from engine_procs.adapters.base import EngineRequest
from ipc import protocol as p


class Send(NamedTuple):
    """A message to the scheduler. Reports go before the records flushed with them (a client
    that sees a task's end finds the scheduler told); an answer that promises the records are
    in the ring (``after_rings``) goes after them."""

    msg: p.Message
    after_rings: bool = False


class Submit(NamedTuple):
    engine: int
    req: EngineRequest


class AbortRequest(NamedTuple):
    engine: int
    rid: int


class StartEngine(NamedTuple):
    """(Re)start the serving engine after ``delay_s``; answer with engine_ready or
    engine_start_failed."""

    engine: int
    delay_s: float


class PrepareEngine(NamedTuple):
    """Start a new engine on ``model_ref`` beside the serving one; answer with prepared."""

    req_id: int
    engine: int
    model_ref: str


class StopEngine(NamedTuple):
    engine: int


class PauseReading(NamedTuple):
    """Stop (or resume) reading the engines: a frontend's ring is full."""

    paused: bool


class Log(NamedTuple):
    level: str
    event: str
    fields: dict[str, Any]


class Stop(NamedTuple):
    """The process should stop (the launcher starts a new one)."""

    reason: str


Effect = (
    Send
    | Submit
    | AbortRequest
    | StartEngine
    | PrepareEngine
    | StopEngine
    | PauseReading
    | Log
    | Stop
)
Record = tuple[int, int, int, int, bytes]  # (frontend, slot, seq, kind, payload)
