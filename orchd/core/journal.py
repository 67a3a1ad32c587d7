"""What the scheduler's durable journal says, and what replaying it means (pure).

The journal is append-only: a task's life is three records (``Admit`` before its 202,
``Start`` before its dispatch, ``End``), a session's is its latest ``SessionRec`` (or a
``SessionGone``). Replaying the records in order gives :class:`Replayed`: every task still
known (queued, started, or ended within its retention) in admission order, and the sessions.
The file and its fsync are ``orchd/scheduler/journal.py``; how a new scheduler core takes the
replayed state over, and what it writes at compaction, is :mod:`orchd.core.recovery`.

Times in records are wall-clock milliseconds (a monotonic clock does not survive a reboot);
the core converts with its ``wall_offset_ms``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec

from ipc import protocol as p


class _Rec(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    pass


class Admit(_Rec):
    task: p.TaskSpec
    at_ms: float


class Start(_Rec):
    task_id: str
    replica: str
    at_ms: float


class End(_Rec):
    task_id: str
    reason: str
    at_ms: float
    error: p.ErrorInfo | None = None


class SessionRec(_Rec):
    """A session as it stands (every field of :class:`orchd.core.sessions.Session`)."""

    id: str
    owner: str
    created_ms: float
    last_used_ms: float
    ttl_ms: int
    tokens_left: int | None
    time_left_ms: float | None
    cost_left: float | None
    turns: int = 0
    kv_bytes: int = 0
    last_replica: str = ""
    reserved_tokens: int = 0
    reserved_cost: float = 0.0
    active: int = 0


class SessionGone(_Rec):
    id: str


Record = Admit | Start | End | SessionRec | SessionGone

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Record)
encode = _encoder.encode


def decode(data: bytes) -> Record:
    return _decoder.decode(data)


@dataclass(slots=True)
class Entry:
    """One task as the journal knows it."""

    spec: p.TaskSpec
    admitted_ms: float
    replica: str = ""  # "" = never started
    started_ms: float = 0.0
    end: End | None = None


@dataclass(slots=True)
class Replayed:
    tasks: dict[str, Entry] = field(default_factory=dict)  # in admission order
    sessions: dict[str, SessionRec] = field(default_factory=dict)

    def apply(self, rec: Record) -> None:
        match rec:
            case Admit(task=spec, at_ms=at):
                # A task id may come again once its first task is forgotten: the newer wins.
                self.tasks.pop(spec.task_id, None)
                self.tasks[spec.task_id] = Entry(spec, at)
            case Start(task_id=tid, replica=replica, at_ms=at):
                e = self.tasks.get(tid)
                if e is not None and e.end is None:
                    e.replica, e.started_ms = replica, at
            case End(task_id=tid):
                e = self.tasks.get(tid)
                if e is not None and e.end is None:
                    e.end = rec
            case SessionRec(id=sid):
                self.sessions[sid] = rec
            case SessionGone(id=sid):
                self.sessions.pop(sid, None)

    def live(self) -> list[Entry]:
        """The tasks that have not ended: queued (no replica) or started, in admission order."""
        return [e for e in self.tasks.values() if e.end is None]


def replay(records: Iterable[Record]) -> Replayed:
    state = Replayed()
    for rec in records:
        state.apply(rec)
    return state
