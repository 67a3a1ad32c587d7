"""The frontend's edge: uvicorn's httptools protocol with the bounds uvicorn does not have.

Measured against uvicorn 0.54 (httptools): its only timer is the keep-alive one, armed after a
response, so a connection that never sends a request, or sends half its headers, is kept
forever; httptools buffers a header of any size (a 32 MiB header cost 32 MB); and
``limit_concurrency`` answers 503 only once a request's headers are in, counting idle
connections too, so idle connections starve new clients. Hence this thin subclass, one
instance per connection, with every bound from ``[limits]``:

- ``max_header_bytes``: request line and headers, counted on the raw bytes before the parser
  sees them (so the parser never buffers more); beyond it 431. ``max_headers``: 431.
- ``header_timeout_ms``: from the connection (or a request's first byte) to its last header
  line; then 408 (or a plain close if nothing came).
- ``body_timeout_ms``: from the headers to the end of the body; then 408.
- ``keepalive_timeout_ms``: uvicorn's keep-alive timer.
- ``max_connections``: at the cap, a new connection closes the oldest idle one (no request
  running: keep-alive, or headers still arriving); if none is idle, it is refused with 503
  and ``Connection: close``, its request read and dropped before the close, never a reset.
- ``send_buffer_bytes``: each socket's kernel send buffer (SO_SNDBUF), so an SSE client that
  stops reading holds at most this in the kernel, beside its stream buffer in the frontend.

Every answer given here is the contract's error envelope with a correlation id, and is logged
as an ``access`` line like the app's answers (``refused_by: edge``; method and path when they
had arrived).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, ClassVar

import msgspec
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from orchd import log
from orchd.config import Limits
from orchd.core.errors import Code, OrchdError

LINGER_S = 1.0  # a refused connection: how long its request is read (and dropped) at most
FD_RESERVE = 256  # descriptors besides connections: rings, sockets, the log, the doorbell
_PHRASES = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


def fds_needed(lim: Limits) -> int:
    """Open files one frontend needs: its connections, a quarter more being refused, the rest."""
    return lim.max_connections * 5 // 4 + FD_RESERVE


def raise_nofile(needed: int) -> tuple[int, int]:
    """Raise this process's soft open-file limit towards ``needed`` (up to the hard limit);
    returns (soft, hard) as they now are."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft, hard


class Edge:
    """One frontend's connections and the bounds they are held to."""

    def __init__(self, lim: Limits) -> None:
        self.max_connections = lim.max_connections
        self.max_header_bytes = lim.max_header_bytes
        self.max_headers = lim.max_headers
        self.header_timeout_s = lim.header_timeout_ms / 1000.0
        self.body_timeout_s = lim.body_timeout_ms / 1000.0
        self.send_buffer_bytes = lim.send_buffer_bytes
        self.live: OrderedDict[EdgeProtocol, None] = OrderedDict()  # oldest first
        self.refused = 0
        self.evicted = 0

    def protocol(self) -> type[EdgeProtocol]:
        """The protocol class uvicorn instantiates per connection, bound to this edge."""
        return type("BoundEdgeProtocol", (EdgeProtocol,), {"edge": self})

    def evict_idle(self) -> bool:
        """Close the oldest connection with no request running; False if every one is busy."""
        for conn in self.live:
            if conn.idle():
                del self.live[conn]
                self.evicted += 1
                conn.transport.close()
                return True
        return False


def raw_response(status: int, err: OrchdError, extra: bytes = b"", cid: bytes = b"") -> bytes:
    body = msgspec.json.encode(err.envelope())
    cid = cid or os.urandom(16).hex().encode()
    phrase = _PHRASES.get(status, b"Service Unavailable")
    return b"".join(
        [
            b"HTTP/1.1 %d %s\r\n" % (status, phrase),
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-correlation-id: %s\r\n" % cid,
            extra,
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class EdgeProtocol(HttpToolsProtocol):
    edge: ClassVar[Edge]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._expect_headers = True  # the next bytes are a request's line and headers
        self._header_bytes = 0
        self._header_count = 0
        self._headers_done = 0
        self._closing = False  # answered here: whatever else comes is read and dropped
        self._dropped = 0
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._on_lost: list[Callable[[], None]] = []

    # ---------------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        edge = self.edge
        if edge.send_buffer_bytes:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, edge.send_buffer_bytes)
        if len(edge.live) >= edge.max_connections and not edge.evict_idle():
            edge.refused += 1
            err = OrchdError(
                Code.POOL_UNAVAILABLE,
                f"this frontend holds {edge.max_connections} busy connections, its limit "
                "(limits.max_connections); retry shortly",
                retry_after_ms=1000,
            )
            self._answer_and_close(503, err, b"retry-after: 1\r\n")
            return
        edge.live[self] = None
        self._header_timer = self.loop.call_later(edge.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.edge.live.pop(self, None)
        self._cancel_timers()
        super().connection_lost(exc)
        callbacks, self._on_lost = self._on_lost, []
        for cb in callbacks:
            cb()

    def idle(self) -> bool:
        """No request is being served: between requests, or its headers not all in yet."""
        return not self._closing and (self.cycle is None or self.cycle.response_complete)

    def _cancel_timers(self) -> None:
        for t in (self._header_timer, self._body_timer):
            if t is not None:
                t.cancel()
        self._header_timer = self._body_timer = None

    def _answer_and_close(self, status: int, err: OrchdError, extra: bytes = b"") -> None:
        """Answer here and close once the client has read it: stop writing (FIN after the
        answer), drop what it still sends, close at its EOF or after LINGER_S."""
        self._closing = True
        self._cancel_timers()
        self.edge.live.pop(self, None)
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.disconnected = True  # the app's response, if any, goes nowhere
            self.cycle.message_event.set()
        t = self.transport
        if t.is_closing():
            return
        cid = os.urandom(16).hex()
        self._log_refusal(status, err, cid)
        t.write(raw_response(status, err, extra, cid.encode()))
        if t.can_write_eof():
            t.write_eof()
            self.loop.call_later(LINGER_S, t.close)
        else:
            t.close()

    def _log_refusal(self, status: int, err: OrchdError, cid: str) -> None:
        fields: dict[str, Any] = {"status": status, "cid": cid, "refused_by": "edge"}
        url = bytes(getattr(self, "url", b"") or b"")
        if self.parser is not None and not self._expect_headers:
            with contextlib.suppress(Exception):  # httptools: the method once headers are in
                fields["method"] = self.parser.get_method().decode("latin-1")
        if url:
            fields["path"] = url.split(b"?", 1)[0].decode("latin-1")[:256]
        client = self.transport.get_extra_info("peername")
        if client:
            fields["client"] = str(client[0])
        fields["reason"] = err.message
        log.info("access", **fields)

    # ---------------------------------------------------------------- bytes in

    def data_received(self, data: bytes) -> None:
        if self._closing:
            self._dropped += len(data)
            if self._dropped > 4 * self.edge.max_header_bytes:
                self.transport.close()  # not a client reading its answer: stop here
            return
        if not self._expect_headers:
            super().data_received(data)
            return
        if self._header_timer is None:  # a request's first byte after a keep-alive wait
            self._header_timer = self.loop.call_later(
                self.edge.header_timeout_s, self._header_timeout
            )
        room = self.edge.max_header_bytes - self._header_bytes
        if len(data) <= room:
            self._header_bytes += len(data)
            super().data_received(data)
            return
        done = self._headers_done
        self._header_bytes += room
        super().data_received(data[:room])  # the parser never holds more than the limit
        if self._closing or self.transport.is_closing():
            return
        if self._headers_done == done:
            err = OrchdError(
                Code.INVALID_PARAMS,
                f"request headers exceed {self.edge.max_header_bytes} bytes "
                "(limits.max_header_bytes)",
            )
            self._answer_and_close(431, err)
            return
        super().data_received(data[room:])

    # ---------------------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_count = 0
        self.scope["extensions"] = {"orchd.conn": {"handle": self}}

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count <= self.edge.max_headers:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._headers_done += 1
        self._expect_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if self._header_count > self.edge.max_headers:
            err = OrchdError(
                Code.INVALID_PARAMS,
                f"more than {self.edge.max_headers} request headers (limits.max_headers)",
            )
            self._answer_and_close(431, err)
            return
        super().on_headers_complete()
        self._body_timer = self.loop.call_later(self.edge.body_timeout_s, self._body_timeout)
        if self in self.edge.live:
            self.edge.live.move_to_end(self)  # the least recently used go first

    def on_body(self, body: bytes) -> None:
        if not self._closing:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._expect_headers = True
        self._header_bytes = 0
        if not self._closing:
            super().on_message_complete()

    # ---------------------------------------------------------------- timers

    def _header_timeout(self) -> None:
        self._header_timer = None
        if not self._expect_headers or self._closing or self.transport.is_closing():
            return
        if self._header_bytes == 0:
            self.transport.close()  # nothing was asked: nothing to answer
            return
        err = OrchdError(
            Code.INVALID_PARAMS,
            f"request headers did not arrive within {self.edge.header_timeout_s:g} s "
            "(limits.header_timeout_ms)",
        )
        self._answer_and_close(408, err)

    def _body_timeout(self) -> None:
        self._body_timer = None
        if self._closing or self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()
            return
        err = OrchdError(
            Code.INVALID_PARAMS,
            f"the request body did not arrive within {self.edge.body_timeout_s:g} s "
            "(limits.body_timeout_ms)",
        )
        self._answer_and_close(408, err)

    # ---------------------------------------------------------------- for the app
    # (``scope["extensions"]["orchd.conn"]["handle"]``: a stream cut off for a slow reader)

    @property
    def lost(self) -> bool:
        return self.parser is None  # (connection_lost has run)

    def on_lost(self, cb: Callable[[], None]) -> None:
        """Call ``cb`` once this connection is closed (at once if it already is)."""
        if self.lost:
            cb()
        else:
            self._on_lost.append(cb)

    def close_after_flush(self) -> None:
        """No further request on this connection: closed once its bytes are out."""
        if not self.transport.is_closing():
            self.transport.close()

    def abort(self) -> None:
        """Drop this connection now, whatever it still holds to send."""
        self.transport.abort()
