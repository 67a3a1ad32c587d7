"""A small HTTP/1.1 + SSE client on raw sockets, so tests see exactly what is on the wire:
chunked framing, event order, and what had already arrived at a given instant."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from tests.support import contract


@dataclass
class Event:
    event: str
    id: str | None
    data: str

    @property
    def json(self) -> Any:
        return json.loads(self.data)


class Dechunker:
    """Incremental ``Transfer-Encoding: chunked`` decoder."""

    def __init__(self) -> None:
        self.buf = b""
        self.done = False
        self.chunks = 0  # HTTP chunks seen: one per write by the server

    def feed(self, data: bytes) -> bytes:
        buf = self.buf + data
        out = bytearray()
        pos = 0
        while not self.done:
            nl = buf.find(b"\r\n", pos)
            if nl < 0:
                break
            size = int(buf[pos:nl].split(b";")[0], 16)
            if len(buf) < nl + 2 + size + 2:
                break
            out += buf[nl + 2 : nl + 2 + size]
            pos = nl + 2 + size + 2
            self.chunks += 1
            if size == 0:
                self.done = True
        self.buf = buf[pos:]
        return bytes(out)


class SSEParser:
    def __init__(self) -> None:
        self.buf = b""
        self.raw = bytearray()  # every decoded byte, for byte-exact comparisons

    def feed(self, data: bytes) -> list[Event]:
        self.raw += data
        blocks = (self.buf + data).split(b"\n\n")
        self.buf = blocks.pop()  # an incomplete event, if any
        events = []
        for block in blocks:
            ev, eid, data_lines = "message", None, []
            for line in block.decode().split("\n"):
                k, _, v = line.partition(": ")
                if k == "event":
                    ev = v
                elif k == "id":
                    eid = v
                elif k == "data":
                    data_lines.append(v)
            text = "\n".join(data_lines)
            contract.check_event(ev, text)
            events.append(Event(ev, eid, text))
        return events


def _head(sock_bytes: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, rest = sock_bytes.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, rest


def _request_bytes(
    method: str, path: str, host: str, port: int, headers: dict[str, str], body: bytes | None
) -> bytes:
    h = {"Host": f"{host}:{port}", **headers}
    if body is not None:
        h["Content-Length"] = str(len(body))
        h.setdefault("Content-Type", "application/json")
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in h.items()), "", ""]
    return "\r\n".join(lines).encode() + (body or b"")


# ---------------------------------------------------------------------------- synchronous


class SyncStream:
    """A blocking SSE connection. Every one still open when its test ends is closed then
    (:func:`close_all`), so a test that walks away mid-stream leaks no socket."""

    open_streams: ClassVar[set[SyncStream]] = set()

    def __init__(self, host: str, port: int, path: str, headers: dict[str, str]) -> None:
        self.sock = socket.create_connection((host, port), timeout=30)
        SyncStream.open_streams.add(self)
        self.sock.sendall(_request_bytes("GET", path, host, port, headers, None))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before headers")
            buf += chunk
        self.status, self.headers, rest = _head(buf)
        self.chunked = self.headers.get("transfer-encoding") == "chunked"
        self.dechunk = Dechunker()
        self.sse = SSEParser()
        self.events: list[Event] = []
        self.body = b""
        self.eof = False
        self._feed(rest)
        if self.status != 200:
            # An error: read its whole (Content-Length) body, then hold it to the contract.
            want = int(self.headers.get("content-length", "0"))
            while len(self.body) < want:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                self.body += chunk
        contract.check_response("GET", path, self.status, self.headers, self.body)

    def _feed(self, data: bytes) -> None:
        if self.status != 200:
            self.body += data
            return
        self.events += self.sse.feed(self.dechunk.feed(data) if self.chunked else data)
        if self.dechunk.done:
            self.eof = True

    def read_until(self, pred: Any, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self) and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"condition not met; events so far: {self.events[-5:]}")
            self.sock.settimeout(left)
            chunk = self.sock.recv(65536)
            if not chunk:
                self.eof = True
                break
            self._feed(chunk)

    def read_available(self) -> None:
        """Take exactly what the kernel already holds for us, without waiting."""
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    self.eof = True
                    break
                self._feed(chunk)
        except BlockingIOError:
            pass
        finally:
            self.sock.setblocking(True)

    def read_to_end(self, timeout: float = 30.0) -> list[Event]:
        self.read_until(lambda s: False, timeout)
        return self.events

    def close(self) -> None:
        self.sock.close()
        SyncStream.open_streams.discard(self)

    @classmethod
    def close_all(cls) -> None:
        for s in list(cls.open_streams):
            s.close()


def sync_request(
    host: str,
    port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    body: Any = None,
    timeout: float = 30.0,
) -> tuple[int, dict[str, str], bytes]:
    raw = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(_request_bytes(method, path, host, port, {**headers, "Connection": "close"}, raw))
        buf = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    if not buf:
        raise ConnectionError(f"{method} {path}: the connection closed before a response")
    status, hdrs, rest = _head(buf)
    if hdrs.get("transfer-encoding") == "chunked":
        rest = Dechunker().feed(rest)
    contract.check_response(method, path, status, hdrs, rest)
    return status, hdrs, rest


# ---------------------------------------------------------------------------- asyncio


@dataclass
class StreamResult:
    status: int
    headers: dict[str, str]
    events: list[Event] = field(default_factory=list)
    raw: bytes = b""


async def async_stream(
    host: str, port: int, path: str, headers: dict[str, str], timeout: float = 60.0
) -> StreamResult:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(_request_bytes("GET", path, host, port, headers, None))
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        status, hdrs, _ = _head(head)
        if status == 200:
            contract.check_response("GET", path, status, hdrs, b"")
        res = StreamResult(status, hdrs)
        dechunk, sse = Dechunker(), SSEParser()
        deadline = time.monotonic() + timeout
        while not dechunk.done:
            data = await asyncio.wait_for(reader.read(65536), deadline - time.monotonic())
            if not data:
                break
            res.events += sse.feed(dechunk.feed(data))
        res.raw = bytes(sse.raw)
        return res
    finally:
        writer.close()


async def async_request(
    host: str, port: int, method: str, path: str, headers: dict[str, str], body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    raw = json.dumps(body).encode() if body is not None else None
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            _request_bytes(method, path, host, port, {**headers, "Connection": "close"}, raw)
        )
        data = await reader.read()
    finally:
        writer.close()
    status, hdrs, rest = _head(data)
    if hdrs.get("transfer-encoding") == "chunked":
        rest = Dechunker().feed(rest)
    contract.check_response(method, path, status, hdrs, rest)
    return status, hdrs, rest
