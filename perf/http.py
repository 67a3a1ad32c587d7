"""A minimal HTTP/1.1 client on a raw asyncio protocol, cheap enough per byte that one client
process can watch tens of thousands of SSE token events per second.

One :class:`Conn` carries one request at a time and is reused (keep-alive) while the server
allows it. A plain response (``Content-Length``) resolves to ``(status, headers, body)``; a
streamed one (``Transfer-Encoding: chunked``, i.e. SSE) feeds each socket read to a
:class:`StreamRec`, which keeps only what the metrics need: the arrival time and token count
of every read that carried tokens.
"""

from __future__ import annotations

import asyncio
import re
import time
from array import array

# The end of a token frame's data, `{"t":...,"i":N}`. The token text is a JSON string, so an
# unescaped `,"i":` occurs nowhere else in orchd's (or the ceiling's) SSE stream.
MARK = b',"i":'
ERROR = b"event: error\n"
DONE = b"\r\n0\r\n\r\n"  # the last chunk of a chunked body
_STAMP = re.compile(rb'"t":"(\d+)"')
# OpenAI streams: a chat chunk's content delta (a completion chunk's "text"), compact or with
# the spaces of Python's json.dumps; the stamp is the whole delta text.
OA_KEYS = {"chat": b"content", "completions": b"text"}
OA_DONE = b"data: [DONE]"
OA_ERROR = b'{"error"'
_OA_STAMP = re.compile(rb'"(?:content|text)": ?"(\d+)"')
# uvicorn closes a keep-alive connection idle for 5 s; a request sent on it just then gets
# no answer (a ConnectionError). Reuse only connections idle for less than this, with room
# for a loaded machine: the server's 5 s start when it has sent a response, ours when we
# have read it.
IDLE_REUSE_S = 2.0


class StreamRec:
    """What one streamed response delivered: reads that carried tokens, and how it ended."""

    __slots__ = (
        "reads", "counts", "tokens", "errors", "error_text", "done", "stamps", "_frag",
        "deltas", "oa_done",
    )  # fmt: skip

    def __init__(self, stamps: array | None = None, deltas: DeltaCounter | None = None) -> None:
        self.reads = array("q")  # CLOCK_MONOTONIC ns of each read that carried >= 1 token
        self.counts = array("l")  # tokens in that read
        self.tokens = 0
        self.errors = 0  # `error` events seen
        self.error_text = b""  # the first one's frame (as far as that read had it)
        self.done = False  # the chunked body ended
        # Engine-emission stamps (mock engine with stamp_tokens): receipt - stamp, in us.
        self.stamps = stamps
        self._frag = b""
        # An OpenAI stream: content deltas are the tokens, `data: [DONE]` the terminal frame.
        self.deltas = deltas
        self.oa_done = False

    def feed_stamps(self, now: int, data: bytes) -> None:
        assert self.stamps is not None
        buf = self._frag + data
        cut = buf.rfind(b"\n\n") + 2
        self._frag = buf[cut:]
        for m in (_STAMP if self.deltas is None else _OA_STAMP).finditer(buf, 0, cut):
            self.stamps.append((now - int(m.group(1))) // 1000)


class DeltaCounter:
    """Counts the non-empty content deltas of an OpenAI stream, read by read, with two
    ``bytes.count`` calls and no JSON parsing.

    A delta is the key pattern (``"content":"`` or ``"content": "``) followed by a character
    other than ``"``: a JSON string holds no unescaped quote, so the pattern occurs only as a
    key, and ``"content":""`` (a role or final chunk) carries nothing. A delta counts in the
    read that brings its first character, so patterns split across reads count once. The
    server's spacing is learnt from the first pattern seen (both are counted until then).
    """

    __slots__ = ("pats", "tail")
    KEEP = 16  # bytes of the last read kept: more than the longest pattern

    def __init__(self, key: bytes = b"content") -> None:
        compact, spaced = b'"%s":"' % key, b'"%s": "' % key
        self.pats: tuple[tuple[bytes, bytes], ...] = (
            (compact, compact + b'"'),
            (spaced, spaced + b'"'),
        )
        self.tail = b""

    def feed(self, data: bytes) -> int:
        w = self.tail + data
        t = len(self.tail)
        end = len(w) - 1  # a pattern at the very end waits for its next character
        n = 0
        for pat, empty in self.pats:
            start = max(0, t - len(pat))  # matches before it counted with the last read
            found = w.count(pat, start, end)
            if found:  # (an empty delta is a pattern too: `found` counts it)
                n += found - w.count(empty, start)
                if len(self.pats) > 1:
                    self.pats = ((pat, empty),)  # the server's spacing, from now on
                    break
        self.tail = w[-DeltaCounter.KEEP :]
        return n


class Conn(asyncio.Protocol):
    """One keep-alive connection; ``simple()`` and ``stream()`` issue one request each."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.reusable = True
        self._buf = bytearray()
        self._head: tuple[int, dict[bytes, bytes]] | None = None
        self._length = -1  # Content-Length of the current response; -1: chunked
        self._fut: asyncio.Future[tuple[int, dict[bytes, bytes], bytes]] | None = None
        self._rec: StreamRec | None = None
        self._tail = b""
        self.counter = [0]  # tokens received, shared by a client's connections (progress)
        self.got_head: asyncio.Event | None = None  # set when a response's head has arrived
        self.idle_since = 0.0  # when the pool last got it back

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.reusable = False
        fut = self._fut
        if fut is not None and not fut.done():
            if self._head is not None:  # a body cut short (or one that ends at close)
                fut.set_result((self._head[0], self._head[1], bytes(self._buf)))
            else:
                fut.set_exception(ConnectionError("connection closed mid-response"))

    def data_received(self, data: bytes) -> None:
        if self._rec is not None and self._head is not None and self._length < 0:
            self._stream_data(data)
            return
        buf = self._buf
        buf += data
        if self._head is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            headers = {}
            for line in lines[1:]:
                k, _, v = line.partition(b":")
                headers[k.strip().lower()] = v.strip()
            self._head = (status, headers)
            if self.got_head is not None:
                self.got_head.set()
            if headers.get(b"connection", b"").lower() == b"close":
                self.reusable = False
            if b"content-length" in headers:
                self._length = int(headers[b"content-length"])
            elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                self._length = -1
            else:
                self._length = -2  # until close
                self.reusable = False
            del buf[: end + 4]
            if self._length == -1:
                rest = bytes(buf)
                buf.clear()
                if self._rec is None:
                    self._rec = StreamRec()  # a chunked reply to a plain request
                if rest:
                    self._stream_data(rest)
                return
        if self._length >= 0 and len(buf) >= self._length:
            body = bytes(buf[: self._length])
            buf.clear()
            self._finish(body)

    # ---------------------------------------------------------------- streaming

    def _stream_data(self, data: bytes) -> None:
        now = time.monotonic_ns()
        rec = self._rec
        assert rec is not None
        if rec.deltas is not None:
            self._openai_data(now, rec, data)
            return
        tail = self._tail
        # Count each marker once: whole in this read, or straddling the previous one and this.
        n = data.count(MARK)
        if tail:
            n += (tail[-4:] + data[:4]).count(MARK)
        if n:
            rec.reads.append(now)
            rec.counts.append(n)
            rec.tokens += n
            self.counter[0] += n
            if rec.stamps is not None:
                rec.feed_stamps(now, data)
        if ERROR in data or (tail and ERROR in tail + data[:12]):
            rec.errors += 1
            if not rec.error_text:
                i = data.find(ERROR)
                rec.error_text = data[i : i + 300] if i >= 0 else b"event: error"
        done = DONE in data or (tail and DONE in tail[-6:] + data[:6])
        self._tail = data[-12:] if len(data) >= 12 else (tail + data)[-12:]
        if done:
            rec.done = True
            self._finish(b"")

    def _openai_data(self, now: int, rec: StreamRec, data: bytes) -> None:
        assert rec.deltas is not None
        n = rec.deltas.feed(data)
        if n:
            rec.reads.append(now)
            rec.counts.append(n)
            rec.tokens += n
            self.counter[0] += n
            if rec.stamps is not None:
                rec.feed_stamps(now, data)
        tail = self._tail
        edge = tail + data[:12] if tail else b""
        if OA_DONE in data or OA_DONE in edge:
            rec.oa_done = True
        if not rec.errors and (OA_ERROR in data or OA_ERROR in edge):
            rec.errors = 1
            i = data.find(OA_ERROR)
            rec.error_text = data[i : i + 300] if i >= 0 else OA_ERROR
        done = DONE in data or (tail and DONE in tail[-6:] + data[:6])
        self._tail = data[-12:] if len(data) >= 12 else (tail + data)[-12:]
        if done:
            rec.done = True
            self._finish(b"")

    def _finish(self, body: bytes) -> None:
        fut, head = self._fut, self._head
        self._fut = None
        self._head = None
        self._rec = None
        self._tail = b""
        if fut is not None and not fut.done() and head is not None:
            fut.set_result((head[0], head[1], body))

    # ---------------------------------------------------------------- requests

    async def simple(self, req: bytes) -> tuple[int, dict[bytes, bytes], bytes]:
        return await self._issue(req, None)

    async def stream(self, req: bytes, rec: StreamRec) -> tuple[int, dict[bytes, bytes], bytes]:
        return await self._issue(req, rec)

    async def _issue(
        self, req: bytes, rec: StreamRec | None
    ) -> tuple[int, dict[bytes, bytes], bytes]:
        assert self.transport is not None and self._fut is None
        self._fut = asyncio.get_running_loop().create_future()
        self._rec = rec
        self._head = None
        self._buf.clear()
        self.transport.write(req)
        return await self._fut

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Idle keep-alive connections to one host:port."""

    def __init__(self, host: str, port: int, counter: list[int] | None = None) -> None:
        self.host = host
        self.port = port
        self.idle: list[Conn] = []
        self.busy: set[Conn] = set()
        self.opened = 0
        self.counter = counter if counter is not None else [0]

    async def acquire(self) -> Conn:
        now = time.monotonic()
        while self.idle:
            c = self.idle.pop()
            if c.reusable and now - c.idle_since < IDLE_REUSE_S:
                self.busy.add(c)
                return c
            c.close()  # (the server may be closing it too: see IDLE_REUSE_S)
        loop = asyncio.get_running_loop()
        _, conn = await loop.create_connection(Conn, self.host, self.port)
        conn.counter = self.counter
        self.opened += 1
        self.busy.add(conn)
        return conn

    def release(self, c: Conn) -> None:
        self.busy.discard(c)
        c.idle_since = time.monotonic()
        if c.reusable:
            self.idle.append(c)
        else:
            c.close()

    def close(self) -> None:
        """Close every connection, idle or busy (a busy stream's request then fails)."""
        for c in self.idle:
            c.close()
        for c in list(self.busy):
            c.close()
        self.idle.clear()


def request(
    method: str, path: str, host: str, key: str, body: bytes | None = None, bearer: bool = False
) -> bytes:
    """One request's bytes; ``bearer``: the key as ``Authorization: Bearer`` (OpenAI's way)."""
    auth = f"Authorization: Bearer {key}" if bearer else f"X-API-Key: {key}"
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{auth}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")
