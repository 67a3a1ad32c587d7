"""The supervisor's end of an engine process's PAIR socket (``EngineProcessAdapter``), driven
with a real mock engine: steps are read as they come, each request's prompt length is reported
before its first token, a pause holds steps in the engine until ``resume``, an engine that dies
mid-request never blocks the supervisor's loop, and an engine that sends what nobody can read
is killed, so that the watcher restarts it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from engine_procs.adapters.base import EngineRequest
from engine_procs.adapters.mock import MockAdapter
from engine_procs.mock_engine import prompt_tokens
from orchd.config import MockEngine, Replica
from tests.fakes.sink import RecordingSink, wait_until


class GarbageAdapter(MockAdapter):
    """The mock engine's adapter, running an engine that answers a submit with junk."""

    module = "tests.fakes.garbage_engine"


@contextlib.asynccontextmanager
async def running(
    tmp_path: Path, cls: type[MockAdapter] = MockAdapter, **mock: Any
) -> AsyncIterator[tuple[MockAdapter, RecordingSink]]:
    sink = RecordingSink()
    replica = Replica(id="r", engine="mock", mock=MockEngine(**mock))
    adapter = cls(replica, f"ipc://{tmp_path}/engine.sock", sink)
    await adapter.start(timeout_s=30)
    try:
        yield adapter, sink
    finally:
        await adapter.stop()


@pytest.mark.timeout(60)
def test_steps_arrive_and_a_pause_holds_them_until_resume(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, itl_ms=1) as (a, sink):
            a.submit(EngineRequest(1, "a prompt", 7, 40))
            assert (await sink.wait_end(1)).reason == "length"
            assert len(sink.tokens[1]) == 40
            a.paused = True  # the supervisor's rings are full
            a.submit(EngineRequest(2, "a prompt", 7, 5))
            assert a._line is not None
            sock = a._line.sock
            # The engine's steps wait in the socket; nothing reaches the sink meanwhile.
            await wait_until(lambda: sock.poll(0, zmq.POLLIN), 10, "a step waiting")
            assert 2 not in sink.tokens
            a.resume()  # no new FD event comes for what already waits: resume reads it
            assert (await sink.wait_end(2)).reason == "length"
            assert len(sink.tokens[2]) == 5

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_prompt_tokens_come_before_the_first_token(tmp_path: Path) -> None:
    prompts = {1: "Hello, world!", 2: "", 3: "a   longer prompt; with   punctuation..."}

    async def main() -> None:
        async with running(tmp_path, itl_ms=1) as (a, sink):
            for rid, prompt in prompts.items():
                a.submit(EngineRequest(rid, prompt, 7, 6))
            for rid in prompts:
                assert (await sink.wait_end(rid)).reason == "length"
            # Hello 2 , 1 world 2 ! 1; nothing; a 1 longer 2 prompt 2 ; 1 with 1
            # punctuation 3 . 1 . 1 . 1
            assert sink.usage == {1: 6, 2: 0, 3: 13}
            assert sink.usage == {rid: prompt_tokens(p) for rid, p in prompts.items()}
            for rid in prompts:
                mine = [kind for kind, r in sink.calls if r == rid]
                assert mine[0] == "on_usage" and mine.count("on_usage") == 1, mine
            assert sink.usage_twice == []

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_sends_to_a_dead_engine_never_block_the_loop(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, itl_ms=5) as (a, sink):
            a.submit(EngineRequest(1, "x", 1, 10_000))
            await wait_until(lambda: sink.tokens[1], 10, "first tokens")
            assert a._proc is not None and a._line is not None
            line, sock = a._line, a._line.sock
            monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            a._proc.kill()
            await wait_until(lambda: sink.dead, 10, "the death reported")
            assert "exited" in sink.dead[0]
            await wait_until(lambda: monitor.poll(0), 10, "the socket seeing its peer go")
            sock.disable_monitor()
            monitor.close(0)
            # What the supervisor sends now has no engine to go to (a blocking send would
            # hang the loop here); it is held and retried instead.
            a.abort(1)
            a.submit(EngineRequest(2, "x", 1, 5))
            await wait_until(lambda: line._retry is not None, 10, "the send held for a retry")
            await a.stop()  # as the supervisor restarts it
            await a.start(timeout_s=30)  # the new engine gets none of the old one's messages
            a.submit(EngineRequest(3, "x", 1, 5))
            assert (await sink.wait_end(3)).reason == "length"
            assert sink.end_of(2) is None

    asyncio.run(main())


@pytest.mark.timeout(60)
def test_an_unreadable_step_kills_the_engine(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, GarbageAdapter) as (a, sink):
            a.submit(EngineRequest(1, "x", 1, 5))
            await wait_until(lambda: sink.dead, 10, "the engine killed and its death reported")
            assert a._proc is not None and a._proc.returncode is not None
            assert not sink.tokens[1]

    asyncio.run(main())
