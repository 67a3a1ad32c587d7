"""The engine process's end of its PAIR socket to the supervisor, shared by the mock and torch
engines: tiny high-water marks (a supervisor that stops reading stalls the engine instead of
letting steps pile up), and a non-blocking read of everything that is waiting.

A step's errors carry no code; an error that is the request's own fault (a chat its model's
template refuses) starts with :data:`INVALID_PREFIX`, which the adapter reports as
``INVALID_PARAMS`` (the rest are ``INTERNAL``)."""

from __future__ import annotations

from collections.abc import Iterator

import zmq

from ipc import protocol as p

INVALID_PREFIX = "invalid request: "


def connect(addr: str) -> tuple[zmq.Context[zmq.Socket[bytes]], zmq.Socket[bytes]]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sock = ctx.socket(zmq.PAIR)
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.setsockopt(zmq.RCVHWM, 64)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    return ctx, sock


def waiting(sock: zmq.Socket[bytes]) -> Iterator[p.EngineMessage]:
    """Every message the supervisor has sent that is here now (each batch one multipart)."""
    # EVENTS, not a recv that raises zmq.Again: the exception costs more than the check.
    while int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
        for frame in sock.recv_multipart(zmq.NOBLOCK):
            yield p.decode_engine(frame)


def error_code(message: str) -> str:
    """The taxonomy code of an engine step's error message (see the module docstring)."""
    return "INVALID_PARAMS" if message.startswith(INVALID_PREFIX) else "INTERNAL"
