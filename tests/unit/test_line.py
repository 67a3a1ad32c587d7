"""ipc/line.py's :class:`Line` on a real ZeroMQ PAIR over inproc://, inside an asyncio loop:
sends of one loop turn go as one message, a pump takes everything waiting, a send nobody can
take is held and retried until a peer is there (and :meth:`Line.discard` drops it), a paused
line leaves input in the socket until :meth:`Line.resume`, and a failing ``on_frame`` stops
reads and goes to ``on_error``."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any

import pytest
import zmq

from ipc.line import RETRY_S, Line
from tests.fakes.sink import wait_until

TIMEOUT_S = 10.0
_addrs = itertools.count()

pytestmark = pytest.mark.timeout(60)


class ClosingContext(zmq.Context):  # type: ignore[type-arg]
    """A context that closes every socket it made when the test ends."""

    made: list[zmq.Socket[bytes]]

    def socket(self, *args: Any, **kwargs: Any) -> zmq.Socket[bytes]:
        sock: zmq.Socket[bytes] = super().socket(*args, **kwargs)
        self.made.append(sock)
        return sock


@pytest.fixture
def ctx() -> Iterator[zmq.Context[zmq.Socket[bytes]]]:
    c = ClosingContext()
    object.__setattr__(c, "made", [])
    try:
        yield c
    finally:
        for sock in c.made:
            sock.close(linger=0)
        c.destroy(linger=0)


class Pair:
    """A :class:`Line` on one PAIR socket, the frames it handed on, and the peer's socket
    (None until :meth:`connect`)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], retry_s: float = RETRY_S) -> None:
        self.ctx = ctx
        self.addr = f"inproc://line-{next(_addrs)}"
        self.sock = ctx.socket(zmq.PAIR)
        self.sock.bind(self.addr)
        self.got: list[bytes] = []
        self.line = Line(self.sock, self.got.append, retry_s=retry_s)
        self.peer: zmq.Socket[bytes] | None = None

    def connect(self) -> zmq.Socket[bytes]:
        self.peer = self.ctx.socket(zmq.PAIR)
        self.peer.connect(self.addr)
        return self.peer

    async def peer_recv(self) -> list[bytes]:
        """The next multipart message the peer receives."""
        peer = self.peer
        assert peer is not None
        await wait_until(lambda: peer.poll(0, zmq.POLLIN), TIMEOUT_S, "a message at the peer")
        return peer.recv_multipart(zmq.NOBLOCK)

    async def waiting_here(self) -> None:
        """Until input waits in the line's socket (its edge may be consumed: on purpose)."""
        await wait_until(lambda: self.sock.poll(0, zmq.POLLIN), TIMEOUT_S, "input waiting")


@contextlib.asynccontextmanager
async def started(
    ctx: zmq.Context[zmq.Socket[bytes]], *, connect: bool = True, retry_s: float = RETRY_S
) -> AsyncIterator[Pair]:
    pair = Pair(ctx, retry_s)
    if connect:
        pair.connect()
    pair.line.start()
    try:
        yield pair
    finally:
        pair.line.stop()


async def turn() -> None:
    """Let the loop run what is ready now (call_soon callbacks), once round."""
    await asyncio.sleep(0)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    asyncio.run(main())


def test_sends_of_one_loop_turn_go_as_one_message(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    async def main() -> None:
        async with started(ctx) as pair:
            for f in (b"a", b"b", b"c"):
                pair.line.send(f)
            assert await pair.peer_recv() == [b"a", b"b", b"c"]
            pair.line.send(b"d")  # a later turn: a message of its own
            assert await pair.peer_recv() == [b"d"]

    run(main)


def test_input_is_read_and_handed_on_in_order(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    async def main() -> None:
        async with started(ctx) as pair:
            assert pair.peer is not None
            pair.peer.send_multipart([b"1", b"2"])
            pair.peer.send(b"3")
            await wait_until(lambda: len(pair.got) == 3, TIMEOUT_S, "three frames")
            assert pair.got == [b"1", b"2", b"3"]

    run(main)


def test_one_pump_takes_everything_waiting(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    async def main() -> None:
        pair = Pair(ctx)  # not started: nothing reads but the explicit pump
        peer = pair.connect()
        expected: list[bytes] = []
        for i in range(50):
            msg = [b"%d" % i, b"%d'" % i]
            peer.send_multipart(msg)
            expected += msg
        await wait_until(
            lambda: int(pair.sock.get(zmq.EVENTS)) & zmq.POLLIN, TIMEOUT_S, "input waiting"
        )
        pair.line.pump()
        assert pair.got == expected

    run(main)


def test_a_send_without_a_peer_is_held_and_delivered_once_one_connects(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    async def main() -> None:
        async with started(ctx, connect=False, retry_s=0.005) as pair:
            pair.line.send(b"held")
            await turn()  # the flush ran: a PAIR with no peer takes nothing
            assert pair.line._retry is not None and pair.line._out == [b"held"]
            pair.line.send(b"held too")  # joins the held message, no flush of its own
            pair.connect()
            assert await pair.peer_recv() == [b"held", b"held too"]
            assert pair.line._out == [] and pair.line._retry is None
            pair.line.send(b"next")  # what was held went exactly once
            assert await pair.peer_recv() == [b"next"]

    run(main)


def test_flush_says_whether_the_socket_took_it(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    async def main() -> None:
        pair = Pair(ctx)
        pair.line.send(b"x")
        assert pair.line.flush() is False  # not started: held, not retried
        assert pair.line._retry is None
        pair.connect()  # the bound end learns of its peer a moment later
        await wait_until(pair.line.flush, TIMEOUT_S, "a flush the socket takes")
        assert await pair.peer_recv() == [b"x"]
        assert pair.line.flush() is True  # nothing left
        assert pair.peer is not None and not pair.peer.poll(0, zmq.POLLIN)

    run(main)


def test_what_was_queued_before_start_goes_out_once_started(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    async def main() -> None:
        pair = Pair(ctx)
        pair.line.send(b"early")
        await turn()  # its flush found no peer; nothing retries a line not started
        pair.line.send(b"later")  # queues behind it, and schedules another try
        await turn()
        assert pair.line._out == [b"early", b"later"]
        pair.connect()
        pair.line.start()
        try:
            assert await pair.peer_recv() == [b"early", b"later"]
        finally:
            pair.line.stop()

    run(main)


def test_discard_drops_what_is_held(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    async def main() -> None:
        async with started(ctx, connect=False, retry_s=0.005) as pair:
            pair.line.send(b"stale")
            await turn()
            assert pair.line._retry is not None
            pair.line.discard()
            assert pair.line._retry is None and pair.line._out == []
            pair.connect()
            pair.line.send(b"fresh")
            assert await pair.peer_recv() == [b"fresh"]

    run(main)


def test_a_paused_line_leaves_input_waiting_until_resume(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    async def main() -> None:
        async with started(ctx) as pair:
            assert pair.peer is not None
            pair.line.paused = True
            pair.peer.send_multipart([b"p1", b"p2"])
            await pair.waiting_here()  # this poll consumes the FD's edge, as a send could
            await turn()
            assert pair.got == []
            pair.line.resume()  # no new edge comes for what waits: resume reads it
            await wait_until(lambda: pair.got == [b"p1", b"p2"], TIMEOUT_S, "the held input")

    run(main)


def test_force_pump_reads_while_paused(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    async def main() -> None:
        pair = Pair(ctx)
        peer = pair.connect()
        pair.line.paused = True
        peer.send(b"f")
        await pair.waiting_here()
        pair.line.pump()
        assert pair.got == []
        pair.line.pump(force=True)
        assert pair.got == [b"f"]

    run(main)


def test_a_failing_on_frame_stops_reads_and_goes_to_on_error(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    async def main() -> None:
        errors: list[BaseException] = []
        got: list[bytes] = []

        def on_frame(frame: bytes) -> None:
            if frame == b"bad":
                raise ValueError("cannot decode")
            got.append(frame)

        sock = ctx.socket(zmq.PAIR)
        sock.bind("inproc://line-failing")
        peer = ctx.socket(zmq.PAIR)
        peer.connect("inproc://line-failing")
        line = Line(sock, on_frame, on_error=errors.append)
        line.start()
        peer.send(b"good")
        peer.send(b"bad")
        await wait_until(lambda: errors, TIMEOUT_S, "on_error")
        assert got == [b"good"] and len(errors) == 1 and isinstance(errors[0], ValueError)
        peer.send(b"after")
        await wait_until(lambda: sock.poll(0, zmq.POLLIN), TIMEOUT_S, "input waiting")
        line.pump()  # a failed line reads no more, even when asked
        line.resume()
        await turn()
        assert got == [b"good"] and len(errors) == 1
        line.send(b"still sends")  # the owner may still say goodbye
        assert line.flush() is True
        assert peer.recv_multipart() == [b"still sends"]

    run(main)


def test_a_reply_sent_from_on_frame_keeps_input_in_order(
    ctx: zmq.Context[zmq.Socket[bytes]],
) -> None:
    """``on_frame`` flushing (which reads after sending) must not hand on later input
    before the rest of the message being handed on."""

    async def main() -> None:
        got: list[bytes] = []
        sock = ctx.socket(zmq.PAIR)
        sock.bind("inproc://line-nested")
        peer = ctx.socket(zmq.PAIR)
        peer.connect("inproc://line-nested")
        line: Line

        def on_frame(frame: bytes) -> None:
            got.append(frame)
            line.send(b"ack " + frame)
            line.flush()

        line = Line(sock, on_frame)
        line.start()
        try:
            peer.send_multipart([b"1", b"2"])
            peer.send_multipart([b"3", b"4"])
            await wait_until(lambda: len(got) == 4, TIMEOUT_S, "four frames")
            assert got == [b"1", b"2", b"3", b"4"]
            acks: list[bytes] = []
            while len(acks) < 4:
                assert peer.poll(int(TIMEOUT_S * 1000), zmq.POLLIN)
                acks += peer.recv_multipart()
            assert acks == [b"ack 1", b"ack 2", b"ack 3", b"ack 4"]
        finally:
            line.stop()

    run(main)


def test_stop_stops_reads_already_scheduled(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    async def main() -> None:
        pair = Pair(ctx)
        peer = pair.connect()
        peer.send(b"unread")
        await pair.waiting_here()
        pair.line.start()  # schedules a read of what came before it
        pair.line.stop()
        await turn()
        assert pair.got == []

    run(main)


def test_input_is_read_while_a_send_is_held(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    """A refused send processes the socket's commands, which can consume the FD's edge that
    announced input: the retries read, or a peer that is itself waiting for an answer would
    never be heard."""

    async def main() -> None:
        sock = ctx.socket(zmq.PAIR)
        sock.set(zmq.SNDHWM, 1)
        sock.bind("inproc://line-full")
        peer = ctx.socket(zmq.PAIR)
        peer.set(zmq.RCVHWM, 1)
        peer.connect("inproc://line-full")

        def taken() -> bool:
            try:
                sock.send(b"fill", zmq.NOBLOCK)
            except zmq.Again:
                return False
            return True

        await wait_until(taken, TIMEOUT_S, "a connected peer")
        while taken():  # the peer reads nothing: fill the pipe
            continue
        got: list[bytes] = []
        line = Line(sock, got.append, retry_s=0.005)
        line.start()
        try:
            # No wake-up from the FD from here on, as if a refused send had consumed it.
            asyncio.get_running_loop().remove_reader(line.fd)
            line.send(b"held")
            await turn()
            assert line._retry is not None
            peer.send(b"in")
            await wait_until(lambda: got == [b"in"], TIMEOUT_S, "input read by a retry")
        finally:
            line.stop()

    run(main)
