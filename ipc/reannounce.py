"""The messages a restarted scheduler rebuilds its state from (beside its journal): it asks a
peer it does not know to say ``Hello`` again (``Rehello``), and the peer re-announces what it
holds. Part of :mod:`ipc.protocol`'s ``Message`` union (re-exported there)."""

from __future__ import annotations

import msgspec


class _Msg(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    pass


class Rehello(_Msg):
    """The scheduler does not know the sender (it restarted, or took it for dead): say
    ``Hello`` again and re-announce what you hold (a supervisor its ``Running`` tasks and its
    ``ReplicaStatus``, a frontend its ``Streams``)."""


class RunningTask(msgspec.Struct, array_like=True, omit_defaults=True):
    """A task a supervisor holds: running, or ended with its transcript kept for a replay."""

    task_id: str
    frontend: int = -1  # the frontend it feeds (-1: nobody)
    slot: int = 0
    stream: str = "none"  # its orchd/core/ownership.py Stream state, by value
    tokens: int = 0  # tokens out so far
    tokens_in: int = 0
    ended: bool = False
    reason: str = ""  # its end reason, once ended
    error_code: str = ""


class Running(_Msg):
    """A supervisor's tasks, sent after every ``Hello`` (none: a fresh process). A restarted
    scheduler adopts them instead of dispatching them again; a task it placed on this replica
    that is not listed was lost with an earlier process (WORKER_RESET)."""

    replica_id: str
    tasks: list[RunningTask] = []


class HeldStream(msgspec.Struct, array_like=True):
    task_id: str
    slot: int
    claimed: bool  # a client reads it (False: a provisional stream opened at admission)


class Streams(_Msg):
    """A frontend's open streams that have no terminal yet, re-announced after ``Rehello``."""

    streams: list[HeldStream] = []
