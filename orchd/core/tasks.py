"""The scheduler core's records: a task's state, and the counters exported as metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ipc import peers
from ipc import protocol as p
from orchd.core.ownership import Stream
from orchd.core.sessions import Grant

Out = list[tuple[str, p.Message]]


class State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    ENDED = "ended"


@dataclass(slots=True)
class Task:
    spec: p.TaskSpec
    enqueued_ms: float
    queue_position: int
    predicted_start_ms: int
    model_ref: str = ""  # canonical
    pools: list[str] = field(default_factory=list)  # where it may run, preferred first
    grant: Grant | None = None
    state: State = State.QUEUED
    replica: str = ""
    placement_reason: str = ""
    started_ms: float = 0.0
    ended_ms: float = 0.0
    # Who streams it (orchd/core/ownership.py): the frontend and its slot, and the state.
    frontend: int = -1
    slot: int = 0
    stream: Stream = Stream.NONE
    replayable: bool = False  # it ended at its supervisor, which keeps the transcript
    end_reason: str = ""
    tokens_out: int = 0  # so far, as of its supervisor's last heartbeat; then at its end
    error: p.ErrorInfo | None = None
    # cancels answered only once the stream's terminal frame is on its socket
    waiting_cancels: list[tuple[str, int]] = field(default_factory=list)


@dataclass(slots=True)
class Stats:
    """Counters the shell exports as Prometheus metrics."""

    enqueued: int = 0
    started: int = 0
    rejected: dict[tuple[str, str], int] = field(default_factory=dict)  # (engine, reason)
    canceled: dict[str, int] = field(default_factory=dict)  # reason
    backpressure: dict[str, int] = field(default_factory=dict)  # policy
    placements: dict[tuple[str, str], int] = field(default_factory=dict)  # (pool, replica)
    tokens_in: int = 0
    tokens_out: int = 0
    first_token_ms: list[float] = field(default_factory=list)  # drained by the shell
    decode_ms: list[float] = field(default_factory=list)

    def bump(self, d: dict[Any, int], k: object) -> None:
        d[k] = d.get(k, 0) + 1


sup = peers.supervisor
fe = peers.frontend
