"""Who is at the other end of the scheduler's ROUTER socket: a typed peer id.

A peer's ZeroMQ identity is its name: ``fe<N>`` (frontend N), ``sup-<replica id>`` (the
supervisor of that replica) or ``launcher``. :class:`Peer` is that name as a ``str`` (so it is
a dict key and a socket identity as it is) that also knows its role, parsed once.
"""

from __future__ import annotations

from typing import Literal

Role = Literal["frontend", "supervisor", "launcher", "internal"]

_SUP = "sup-"
_FE = "fe"


class Peer(str):
    """A peer's name. Build one with :func:`frontend`, :func:`supervisor` or :data:`LAUNCHER`,
    or parse a socket identity with ``Peer(name)``."""

    __slots__ = ()

    @property
    def role(self) -> Role:
        if self.startswith(_SUP):
            return "supervisor"
        if self.startswith(_FE) and self[2:].isdigit():
            return "frontend"
        if self == "launcher":
            return "launcher"
        return "internal"

    @property
    def frontend_index(self) -> int:
        """N of ``fe<N>``; -1 for any other peer."""
        return int(self[2:]) if self.role == "frontend" else -1

    @property
    def replica_id(self) -> str:
        """The replica of ``sup-<id>``; "" for any other peer."""
        return self[len(_SUP) :] if self.role == "supervisor" else ""

    @property
    def wire(self) -> bytes:
        return self.encode()


def frontend(index: int) -> Peer:
    return Peer(f"{_FE}{index}")


def supervisor(replica_id: str) -> Peer:
    return Peer(f"{_SUP}{replica_id}")


LAUNCHER = Peer("launcher")
INTERNAL = Peer("")  # a request the scheduler makes of itself: nobody waits for the answer
