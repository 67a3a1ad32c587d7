"""One ZeroMQ socket on an asyncio loop, the way every orchd process drives one.

- Reads come from ``loop.add_reader`` on the socket's FD, and everything waiting is taken in
  one go while ``zmq.EVENTS`` says there is input: no zmq.asyncio future per message, and no
  ``zmq.Again`` exception per empty read (building it costs more than the check).
- Everything sent in one event-loop turn goes as one multipart message: one wake-up of
  ZeroMQ's I/O thread instead of one per message.
- A send the socket will not take now (its peer is gone, or not reading) is held and retried
  every ``retry_s``; :meth:`discard` drops what is held.
- The FD is edge-triggered: after every send (taken or not), and on :meth:`resume`, input is
  read again, since the send may have consumed the edge that announced it.

The frontend's scheduler client, the supervisor's scheduler line and the supervisor's end of
an engine's PAIR socket are each one :class:`Line`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import zmq

Socket = zmq.Socket[bytes]

RETRY_S = 0.01


class Line:
    def __init__(
        self,
        sock: Socket,
        on_frame: Callable[[bytes], None],
        *,
        on_error: Callable[[BaseException], None] | None = None,
        retry_s: float = RETRY_S,
    ) -> None:
        self.sock = sock
        self.on_frame = on_frame
        self.on_error = on_error
        self.retry_s = retry_s
        self.paused = False  # reading stops while set (the reader applies back-pressure)
        self.fd: int = sock.getsockopt(zmq.FD)  # type: ignore[assignment]
        self._out: list[bytes] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._flush_soon = False  # a flush is scheduled for the end of this loop turn
        self._reading = False  # inside pump: a nested pump (on_frame -> flush) must not read
        self._failed = False

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._failed = False  # a line its owner starts again reads again
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.fd, self.pump)
        self._loop.call_soon(self._pump_if_started)  # input that came before the reader did
        if self._out and not self._flush_soon:  # queued before start and not taken then
            self._schedule_flush(self._loop)

    def stop(self) -> None:
        """Stop reading and retrying; what is queued stays (:meth:`flush` sends it)."""
        self._cancel_retry()
        if self._loop is not None:
            self._loop.remove_reader(self.fd)
            self._loop = None

    # ---------------------------------------------------------------- sending

    def send(self, frame: bytes) -> None:
        """Queue ``frame``; the queue goes out once this event-loop turn ends."""
        self._out.append(frame)
        if not self._flush_soon and self._retry is None:
            self._schedule_flush(self._loop or asyncio.get_running_loop())

    def _schedule_flush(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush_soon = True
        loop.call_soon(self.flush)

    def flush(self) -> bool:
        """Send what is queued now; False if the socket would not take it (it is retried
        while started)."""
        self._flush_soon = False
        self._cancel_retry()
        if not self._out:
            return True
        try:
            self.sock.send_multipart(self._out, zmq.NOBLOCK)
        except zmq.Again:
            if self._loop is not None:
                self._retry = self._loop.call_later(self.retry_s, self.flush)
                self.pump()  # a refused send consumes input edges too
            return False
        self._out = []
        if self._loop is not None:
            self.pump()
        return True

    def discard(self) -> None:
        """Drop whatever is queued or held for retry."""
        self._out = []
        self._cancel_retry()

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None

    # ---------------------------------------------------------------- receiving

    def pump(self, *, force: bool = False) -> None:
        """Hand every frame waiting to ``on_frame``; ``force`` reads even while paused."""
        sock = self.sock
        if self._failed or self._reading:
            return  # nested (on_frame sent something): the outer loop reads what came
        self._reading = True
        try:
            while (force or not self.paused) and int(sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
                for frame in sock.recv_multipart(zmq.NOBLOCK):
                    self.on_frame(frame)
        except Exception as e:
            if self.on_error is None:
                raise
            self._failed = True  # read no more: the owner decides what happens next
            self.stop()
            self.on_error(e)
        finally:
            self._reading = False

    def _pump_if_started(self) -> None:
        if self._loop is not None:  # not stopped since this was scheduled
            self.pump()

    def resume(self) -> None:
        self.paused = False
        loop = self._loop
        if loop is not None:
            loop.call_soon(self._pump_if_started)
