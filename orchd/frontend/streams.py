"""Open SSE streams of this frontend, and the drain that feeds them from the token rings.

The drain wakes on the doorbell (or a slow periodic recheck), reads every ring this frontend
owns, appends each record's bytes to its stream's buffer and wakes that stream's writer,
which sends everything buffered with one ``send``. No JSON is parsed here: records are
finished SSE frames.

Resumable streams: a stream this frontend must end for a reason of its own (the scheduler
declared it lost, another connection took the stream over) gets an ``error`` frame with no
``id:``, so its client's ``Last-Event-ID`` stays the last event it got; every other frame is the
task's own, with the id the supervisor gave it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable
from typing import Literal

from ipc import openai_frames as oa
from ipc import protocol as p
from ipc.doorbell import BellReader
from ipc.frames import KIND_TERMINAL, end_frame, error_frame
from ipc.ring import RingReader
from orchd.core.errors import Code, OrchdError
from orchd.core.ownership import ENDED, Ev, step
from orchd.core.ownership import Stream as State

# Errors about a stream's connection, not its task: written with no id (the task runs on).
CONNECTION_ERRORS = frozenset({Code.STREAM_INTERRUPTED, Code.STREAM_CONFLICT})
RECHECK_S = 0.1  # while streams are open
IDLE_RECHECK_S = 1.0  # while none are
FENCE_TIMEOUT_S = 5.0

# The shape of a stream's bytes: orchd's SSE events, OpenAI's streamed chunks, or one
# OpenAI response body (a request that does not stream).
Codec = Literal["native", "openai", "body"]


class Stream:
    """One SSE stream of this frontend; its ``state`` follows :mod:`orchd.core.ownership`."""

    __slots__ = (
        "slot",
        "task_id",
        "codec",
        "state",
        "buf",
        "last_seq",
        "waiter",
        "flushed",
        "client_gone",
        "overflow",
        "opened_at",
        "budgets",
    )

    def __init__(
        self, slot: int, task_id: str, event: Ev = Ev.SUBSCRIBE, codec: Codec = "native"
    ) -> None:
        self.slot = slot
        self.task_id = task_id
        self.codec = codec  # the shape of its bytes, for the frames this frontend writes
        self.state = step(State.NONE, event)  # opened at admission (OPEN) or by a GET
        # Bytes not yet handed to the socket, copied in record by record: one buffer per
        # stream rather than one object per record, so a backlog costs its own size.
        self.buf = bytearray()
        self.last_seq = -1
        self.waiter: asyncio.Future[None] | None = None
        self.flushed: list[asyncio.Future[None]] = []  # fences waiting for the terminal
        self.client_gone = False
        self.overflow = False
        self.opened_at = 0.0
        self.budgets: p.Budgets | None = None

    @property
    def terminal(self) -> bool:
        """The terminal frame is buffered (or already sent)."""
        return self.state in ENDED

    @property
    def sent_terminal(self) -> bool:
        return self.state is State.DONE

    @property
    def provisional(self) -> bool:
        """Opened at admission; no client has claimed it yet."""
        return self.state in (State.PROVISIONAL, State.PROVISIONAL_ENDED)

    def end(self) -> None:
        """The terminal frame is in the buffer."""
        self.state = step(self.state, Ev.TERMINAL)

    def fail(self, err: OrchdError) -> None:
        """End the stream with an error this frontend writes, in the stream's own shape. One
        about the connection (the task runs on) has no id: the client resumes after its last
        event."""
        envelope = err.envelope()
        seq = None if err.code in CONNECTION_ERRORS else self.last_seq + 1
        if self.codec == "native":
            self.push_terminal(error_frame(seq, envelope))
        elif self.codec == "openai":
            self.push_terminal(oa.error_frame(seq, err.openai()))
        else:
            self.push_terminal(oa.encode(err.openai()))

    def finish(self, reason: str) -> None:
        """End the stream of a task that never ran (canceled while queued)."""
        if self.codec == "native":
            self.push_terminal(end_frame(self.last_seq + 1, 0, 0.0, 0.0, reason))
        elif self.codec == "openai":
            self.push_terminal(oa.DONE)
        else:
            self.fail(OrchdError(Code.INVALID_PARAMS, f"the request ended: {reason}"))

    def wake(self) -> None:
        w = self.waiter
        if w is not None:
            self.waiter = None
            if not w.done():
                w.set_result(None)

    def push_terminal(self, frame: bytes) -> None:
        if not self.terminal:
            self.buf += frame
            self.end()
            self.wake()

    def mark_sent(self) -> None:
        """Nothing more goes to the socket: the terminal is sent, or the stream is closed."""
        if self.state is State.TERMINAL_PENDING:
            self.state = step(self.state, Ev.SENT)
        for f in self.flushed:
            if not f.done():
                f.set_result(None)
        self.flushed.clear()


class StreamTable:
    def __init__(
        self,
        ring_names: list[str],
        bell_path: str,
        *,
        max_streams: int,
        buffer_limit: int,
        on_overflow: Callable[[Stream], None],
        provisional_ttl_s: float = 60.0,
    ) -> None:
        self.readers = [RingReader(n, skip_existing=True) for n in ring_names]
        self.bell = BellReader(bell_path)
        self.streams: dict[int, Stream] = {}
        self.max_streams = max_streams
        self.buffer_limit = buffer_limit
        self.on_overflow = on_overflow
        self.slots = itertools.count(1)
        self.reply: Callable[[p.Message], None] = lambda m: None
        # Provisional streams by task id, oldest first (they expire after provisional_ttl_s).
        self.provisional: dict[str, Stream] = {}
        self.provisional_ttl_s = provisional_ttl_s
        self._recheck: asyncio.TimerHandle | None = None
        self.records_in = 0
        self.drains = 0

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.bell.fd, self._on_bell)
        self._schedule_recheck(loop)
        self.drain()

    def stop(self) -> None:
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.bell.fd)
        if self._recheck is not None:
            self._recheck.cancel()
        for r in self.readers:
            r.close()
        self.bell.close()

    def open(self, task_id: str, after_seq: int = -1) -> Stream:
        """A stream for a client's GET (resuming after event ``after_seq``, or -1)."""
        if len(self.streams) >= self.max_streams:
            raise OrchdError(
                Code.REPLICA_EXHAUSTED,
                f"this frontend already serves {self.max_streams} streams",
                retry_after_ms=1000,
            )
        s = Stream(next(self.slots) & 0xFFFFFFFF, task_id)
        s.last_seq = after_seq  # (the frames this frontend writes itself number on from it)
        self.streams[s.slot] = s
        return s

    def open_provisional(self, task_id: str, codec: Codec = "native") -> Stream | None:
        """A stream opened at admission, fed from the start; None when the table is full
        (the task is then streamed the ordinary way)."""
        if len(self.streams) >= self.max_streams or task_id in self.provisional:
            return None
        s = Stream(next(self.slots) & 0xFFFFFFFF, task_id, Ev.OPEN, codec)
        s.opened_at = time.monotonic()
        self.streams[s.slot] = s
        self.provisional[task_id] = s
        return s

    def claim(self, task_id: str) -> Stream | None:
        """The provisional stream of ``task_id``, now a client's; None if there is none."""
        s = self.provisional.pop(task_id, None)
        if s is not None:
            s.state = step(s.state, Ev.CLAIM)
        return s

    def drop_provisional(self, s: Stream) -> None:
        self.provisional.pop(s.task_id, None)
        s.state = step(s.state, Ev.DETACH)
        self.close(s)

    def close(self, s: Stream) -> None:
        self.streams.pop(s.slot, None)
        if s.provisional:
            self.provisional.pop(s.task_id, None)
        s.mark_sent()  # nothing more will be sent: release any fence

    def expire_provisional(self, now: float) -> list[Stream]:
        """Unclaimed provisional streams past their time: dropped (the caller unsubscribes)."""
        gone = []
        for s in list(self.provisional.values()):
            if now - s.opened_at < self.provisional_ttl_s:
                break  # (insertion order is age order)
            self.drop_provisional(s)
            gone.append(s)
        return gone

    # ---------------------------------------------------------------- the drain

    def _schedule_recheck(self, loop: asyncio.AbstractEventLoop) -> None:
        delay = RECHECK_S if self.streams else IDLE_RECHECK_S
        self._recheck = loop.call_later(delay, self._on_recheck, loop)

    def _on_recheck(self, loop: asyncio.AbstractEventLoop) -> None:
        # Recovers a wake-up lost to a park/publish race; costs a few loads when idle.
        if any(r.pending() for r in self.readers):
            self.drain()
        for gone in self.expire_provisional(time.monotonic()):
            self.reply(p.Unsubscribe(gone.task_id))
        self._schedule_recheck(loop)

    def _on_bell(self) -> None:
        self.bell.clear()
        self.drain()

    def drain(self) -> None:
        streams = self.streams
        limit = self.buffer_limit
        while True:
            self.drains += 1
            for reader in self.readers:
                n = 0
                for slot, seq, kind, payload in reader.records():
                    n += 1
                    s = streams.get(slot)
                    if s is None or s.terminal:
                        continue  # a stream that is gone, or already ended
                    s.buf += payload  # (a view of the ring: copied out here)
                    s.last_seq = seq
                    if kind == KIND_TERMINAL:
                        s.end()
                    elif len(s.buf) > limit and not s.overflow:
                        if s.provisional:
                            # Nobody reads it yet: let go (a later GET replays the transcript).
                            self.drop_provisional(s)
                            self.reply(p.Unsubscribe(s.task_id))
                            continue
                        s.overflow = True
                        self.on_overflow(s)
                    s.wake()
                self.records_in += n
            # Park every ring; if anything was published meanwhile, go round again.
            again = False
            for reader in self.readers:
                if reader.park():
                    again = True
            if not again:
                return

    # ---------------------------------------------------------------- scheduler notices

    def on_notice(self, msg: p.Fence | p.StreamFail | p.StreamEnd | p.Release) -> None:
        self.drain()  # whatever the producer published comes first
        s = self.streams.get(msg.slot)
        if s is not None and not isinstance(msg, p.Fence) and s.task_id != msg.task_id:
            s = None  # (a notice for a slot since reused: a frontend restarts its slots)
        if isinstance(msg, p.Release):
            if s is None or s.task_id != msg.task_id:
                return
            if s.provisional:
                self.drop_provisional(s)  # a client streams it from another frontend
            elif not s.terminal:
                # Another connection resumed it (Last-Event-ID): this one ends.
                s.fail(
                    OrchdError(
                        Code.STREAM_CONFLICT,
                        "another connection took this stream over with Last-Event-ID",
                    )
                )
            return
        if isinstance(msg, p.StreamFail) and s is not None:
            err = OrchdError(
                msg.error.code,
                msg.error.message,
                engine=msg.error.engine,
                retry_after_ms=msg.error.retry_after_ms,
                pool_id=msg.error.pool_id,
            )
            s.fail(err)
        elif isinstance(msg, p.StreamEnd) and s is not None:
            s.finish(msg.reason)
        if s is None or s.sent_terminal or s.provisional:
            self.reply(p.FenceDone(msg.req_id))  # (an unclaimed stream has no wire yet)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        s.flushed.append(fut)
        asyncio.get_running_loop().create_task(self._answer_fence(msg.req_id, fut))

    async def _answer_fence(self, req_id: int, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(fut, FENCE_TIMEOUT_S)
        self.reply(p.FenceDone(req_id))
