"""A tiny HTTP/1.1 server on raw asyncio streams, so a fake engine controls every byte it
sends (chunk framing, a cut mid-body, a malformed event) and sees its client go away.

One request per connection (``Connection: close``): simple, and httpx copes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 503: "Service Unavailable"}


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    _gone: asyncio.Task[bytes] | None = field(default=None, repr=False)

    def json(self) -> Any:
        return json.loads(self.body or b"{}")

    # ------------------------------------------------------------ plain responses

    async def respond(
        self, status: int, body: Any = b"", headers: dict[str, str] | None = None
    ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        ctype = "application/json" if not isinstance(body, bytes) else "text/plain"
        head = {"Content-Type": ctype, "Content-Length": str(len(raw)), **(headers or {})}
        self.writer.write(self._head(status, head) + raw)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def _head(self, status: int, headers: dict[str, str]) -> bytes:
        lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}"]
        lines += [f"{k}: {v}" for k, v in {**headers, "Connection": "close"}.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode()

    # ------------------------------------------------------------ streaming (chunked)

    async def start_stream(self, content_type: str = "text/event-stream") -> None:
        head = {"Content-Type": content_type, "Transfer-Encoding": "chunked"}
        self.writer.write(self._head(200, head))
        await self.writer.drain()
        self.watch()

    def watch(self) -> None:
        """Notice the client leaving: it sends nothing more on this connection, so any read
        result means it left."""
        if self._gone is None:
            self._gone = asyncio.get_running_loop().create_task(self.reader.read(1))

    async def send(self, data: bytes) -> bool:
        """Write one chunk; False once the client is gone."""
        if self.gone:
            return False
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))
        try:
            await self.writer.drain()
        except ConnectionError:
            return False
        return True

    async def end_stream(self) -> None:
        self.writer.write(b"0\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    def cut(self) -> None:
        """Drop the connection mid-body (no terminating chunk)."""
        self.writer.transport.abort()

    @property
    def gone(self) -> bool:
        return self._gone is not None and self._gone.done()

    async def wait_gone(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for the client to leave; True if it did."""
        if self._gone is None:
            await asyncio.sleep(timeout)
            return False
        done, _ = await asyncio.wait({self._gone}, timeout=timeout)
        return bool(done)

    def close(self) -> None:
        if self._gone is not None:
            self._gone.cancel()
        self.writer.close()


Handler = Callable[[Request], Awaitable[None]]


class HttpServer:
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self._conn, host, port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 2.0)

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = {}
        for ln in lines[1:]:
            if ln:
                k, _, v = ln.partition(":")
                headers[k.strip().lower()] = v.strip()
        body = b""
        if int(headers.get("content-length", "0")):
            body = await reader.readexactly(int(headers["content-length"]))
        req = Request(method, path, headers, body, reader, writer)
        try:
            await self.handler(req)
        except ConnectionError:
            pass
        finally:
            req.close()
