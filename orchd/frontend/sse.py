"""The SSE response: writes a stream's buffered frames with one ``send`` per wake-up."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.types import Receive, Scope, Send

from orchd.frontend.streams import Stream

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def watch_disconnect(receive: Receive, s: Stream) -> asyncio.Task[None]:
    """A task that marks ``s``'s client gone, and wakes its writer, when the client
    disconnects; cancel it once the response is done."""

    async def watch() -> None:
        while (await receive())["type"] != "http.disconnect":
            continue
        s.client_gone = True
        s.wake()

    return asyncio.get_running_loop().create_task(watch())


class SSEResponse:
    def __init__(
        self,
        stream: Stream,
        headers: list[tuple[bytes, bytes]],
        on_done: Callable[[Stream], None],
    ) -> None:
        self.stream = stream
        self.headers = headers
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        s = self.stream
        loop = asyncio.get_running_loop()
        watcher = watch_disconnect(receive, s)
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": SSE_HEADERS + self.headers,
                }
            )
            while True:
                if s.client_gone:
                    break
                if s.buf:
                    data, s.buf = s.buf, bytearray()  # handed over whole, not copied
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                    continue
                if s.terminal:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                    s.mark_sent()
                    break
                s.waiter = loop.create_future()
                await s.waiter
        finally:
            watcher.cancel()
            self.on_done(s)
