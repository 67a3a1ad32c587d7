"""Adapter scenarios shared by tests/unit/test_adapter_*.py: each drives one adapter against
a fake engine of its dialect (in the same event loop) and checks what reached the sink."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from engine_procs.adapters.base import EngineRequest
from engine_procs.adapters.http_base import HttpAdapter
from engine_procs.engine_process import free_port
from orchd.config import Endpoint, Replica
from tests.fakes.engines import (
    MODEL,
    FakeEngine,
    Faults,
    Seen,
    embedding_for,
    prompt_tokens,
    render_chat,
    tokens_for,
)
from tests.fakes.sink import RecordingSink, wait_until

T = TypeVar("T")

# The dialects whose engines say a stream's prompt length (each adapter's docstring says where).
REPORTS_PROMPT = {"openai", "llamacpp", "tgi"}
CHAT = [("system", "Answer in one word."), ("user", 'say "hi"')]
Scenario = Callable[[HttpAdapter, RecordingSink, FakeEngine], Awaitable[T]]


def adapter_for(
    cls: type[HttpAdapter],
    url: str,
    *,
    decode_timeout_ms: int = 5_000,
    chat: bool = False,
    engine: str = "mock",
) -> tuple[HttpAdapter, RecordingSink]:
    replica = Replica(
        id="r0",
        engine=engine,
        slots=8,
        decode_timeout_ms=decode_timeout_ms,
        endpoint=Endpoint(url=url, model=MODEL if cls.name == "triton" else "", chat=chat),
    )
    sink = RecordingSink()
    return cls(replica, "tcp://unused", sink), sink


def run(
    cls: type[HttpAdapter],
    dialect: str,
    scenario: Scenario[T],
    faults: Faults | None = None,
    **kw: Any,
) -> T:
    """Start a fake and an adapter on it, run ``scenario``, stop both."""

    async def main() -> T:
        fake = await FakeEngine(dialect, faults or Faults()).start()
        adapter, sink = adapter_for(cls, fake.url, **kw)
        try:
            await adapter.start(timeout_s=5.0)
            result = await scenario(adapter, sink, fake)
            assert sink.after_end == [], f"events after a request ended: {sink.after_end}"
            assert sink.usage_twice == [], f"usage reported twice: {sink.usage_twice}"
            return result
        finally:
            await adapter.stop()
            await fake.stop()

    return asyncio.run(main())


def req(rid: int, max_tokens: int = 8, seed: int = 7, prompt: str = "say hi") -> EngineRequest:
    return EngineRequest(rid, prompt, seed, max_tokens)


def chat_req(
    rid: int,
    max_tokens: int = 8,
    seed: int = 7,
    messages: list[tuple[str, str]] | None = None,
    stop: list[str] | None = None,
) -> EngineRequest:
    return EngineRequest(rid, "", seed, max_tokens, messages=messages or CHAT, stop=stop)


def prompt_seen(a: HttpAdapter, r: EngineRequest) -> str:
    """The text the fake engine generates from for ``r``: a chat rendered with its template
    (the openai adapter's ``endpoint.chat`` sends a prompt as one user turn), else the prompt."""
    if r.messages is not None:
        return render_chat([{"role": role, "content": c} for role, c in r.messages])
    if a.name == "openai" and a.replica.endpoint.chat:
        return render_chat([{"role": "user", "content": r.prompt}])
    return r.prompt


def expected_tokens(a: HttpAdapter, r: EngineRequest) -> list[str]:
    return tokens_for(r.seed, prompt_seen(a, r), r.max_tokens)


def expected_usage(a: HttpAdapter, *reqs: EngineRequest) -> dict[int, int]:
    """What ``on_usage`` should have said for ``reqs``, by rid: the fake's prompt length
    where the adapter's engine reports one, else nothing."""
    if a.name not in REPORTS_PROMPT:
        return {}
    return {r.rid: prompt_tokens(prompt_seen(a, r)) for r in reqs}


# ------------------------------------------------------------------------------ scenarios


async def completes(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> list[dict[str, Any]]:
    """Three concurrent requests, each gets exactly its seeded tokens and ends with length."""
    reqs = [req(1, 8, 7), req(2, 5, 8, 'a "quoted" prompt'), req(3, 12, 9, "")]
    for r in reqs:
        a.submit(r)
    for r in reqs:
        end = await sink.wait_end(r.rid)
        assert (end.kind, end.reason) == ("finish", "length"), end
        assert sink.tokens[r.rid] == expected_tokens(a, r)
    # Each prompt's own length (2, 4 and 1 fake tokens), reported before its end.
    assert sink.usage == expected_usage(a, *reqs)
    return [s.body for s in fake.seen]


async def eos_is_stop(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    a.submit(req(1, 8))
    end = await sink.wait_end(1)
    assert (end.kind, end.reason) == ("finish", "stop"), end
    assert sink.tokens[1] == expected_tokens(a, req(1))[: fake.faults.eos_at]
    assert sink.usage == expected_usage(a, req(1))


async def chat_completes(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> dict[int, Seen]:
    """Chats beside a completion: each chat streams the tokens of its rendered messages, ends
    with length and reports its rendered prompt's length; what the fake saw goes back by rid
    (told apart by their max_tokens) for checking paths and bodies."""
    reqs = [
        chat_req(1, 8, 7),
        chat_req(2, 5, 8, [("user", "a\nmultiline\nturn")], stop=["\n\n", "END"]),
        req(3, 4, 9),
    ]
    for r in reqs:
        a.submit(r)
    for r in reqs:
        end = await sink.wait_end(r.rid)
        assert (end.kind, end.reason) == ("finish", "length"), end
        assert sink.tokens[r.rid] == expected_tokens(a, r)
    assert sink.usage == expected_usage(a, *reqs)
    assert len(fake.seen) == 3
    rid_of = {r.max_tokens: r.rid for r in reqs}
    return {rid_of[fake.dialect_params(s)[2]]: s for s in fake.seen}


async def chat_eos_is_stop(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    a.submit(chat_req(1, 8))
    end = await sink.wait_end(1)
    assert (end.kind, end.reason) == ("finish", "stop"), end
    assert sink.tokens[1] == expected_tokens(a, chat_req(1, 8))[: fake.faults.eos_at]
    assert sink.usage == expected_usage(a, chat_req(1))


async def chat_refused(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    """An adapter whose engine takes no chat fails one clearly, and never sends it."""
    a.submit(chat_req(1))
    end = await sink.wait_end(1)
    assert (end.kind, end.reason) == ("error", "INVALID_PARAMS"), end
    assert a.name in end.message and "chat" in end.message
    assert fake.seen == []
    a.submit(req(2, 3))  # completions go on
    assert (await sink.wait_end(2)).kind == "finish"


def embed_req(rid: int, inputs: list[str]) -> EngineRequest:
    return EngineRequest(rid, "", 0, 1, workload="embedding", inputs=inputs)


async def embeddings_pass_through(
    a: HttpAdapter, sink: RecordingSink, fake: FakeEngine
) -> list[dict[str, Any]]:
    """The engine's vectors, one per input in order, after the tokens it read."""
    inputs = ["first input", "the second input", "first input", "é 日本 🙂"]
    a.submit(embed_req(1, inputs))
    a.submit(embed_req(2, ["alone"]))
    for rid in (1, 2):
        assert (await sink.wait_end(rid)).kind == "embedding"
        assert [k for k, r in sink.calls if r == rid] == ["on_usage", "on_embedding"]
    assert sink.vectors[1] == [embedding_for(t) for t in inputs]
    assert sink.vectors[2] == [embedding_for("alone")]
    assert sink.usage == {1: sum(prompt_tokens(t) for t in inputs), 2: prompt_tokens("alone")}
    return [s.body for s in fake.seen]


async def embeddings_refused(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    a.submit(embed_req(1, ["x"]))
    end = await sink.wait_end(1)
    assert (end.kind, end.reason) == ("error", "INVALID_PARAMS"), end
    assert a.name in end.message and "embeddings" in end.message
    assert fake.seen == [] and 1 not in sink.vectors


async def disconnect_is_worker_reset(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    a.submit(req(1, 8))
    end = await sink.wait_end(1)
    assert (end.kind, end.reason) == ("error", "WORKER_RESET"), end
    assert sink.tokens[1] == tokens_for(7, "say hi", 8)[: fake.faults.disconnect_after]
    assert sink.dead == []  # one lost connection is not a dead engine


async def malformed_is_internal(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    a.submit(req(1, 8))
    end = await sink.wait_end(1)
    assert (end.kind, end.reason) == ("error", "INTERNAL"), end
    assert "malformed" in end.message
    # The adapter hung up on the engine, so the engine stops generating.
    await wait_until(lambda: fake.canceled, 5, "the fake to see the client go")


async def engine_error_is_internal(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    a.submit(req(1, 8))
    end = await sink.wait_end(1)
    assert (end.kind, end.reason) == ("error", "INTERNAL"), end
    assert "fault injected" in end.message
    assert len(sink.tokens[1]) == fake.faults.error_after
    # Only llama.cpp says the prompt's length before its stream's last event.
    assert sink.usage == (expected_usage(a, req(1)) if a.name == "llamacpp" else {})


async def slow_first_token_ok(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    t0 = time.monotonic()
    a.submit(req(1, 4))
    end = await sink.wait_end(1)
    assert (end.kind, end.reason) == ("finish", "length"), end
    assert time.monotonic() - t0 >= fake.faults.first_token_delay_s
    assert sink.tokens[1] == tokens_for(7, "say hi", 4)


async def no_token_is_decode_timeout(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    t0 = time.monotonic()
    a.submit(req(1, 4))
    end = await sink.wait_end(1, timeout=fake.faults.first_token_delay_s)
    assert (end.kind, end.reason) == ("error", "DECODE_TIMEOUT"), end
    assert time.monotonic() - t0 < fake.faults.first_token_delay_s
    await wait_until(lambda: fake.canceled, 5, "the fake to see the client go")
    a.abort(1)  # what the supervisor does after a failure: must stay silent
    await asyncio.sleep(0)
    assert len(sink.ends) == 1


async def overloaded_503(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    a.submit(req(1, 4))
    end = await sink.wait_end(1)
    assert (end.kind, end.reason) == ("error", "POOL_UNAVAILABLE"), end
    assert end.retry_after_ms == int(fake.faults.retry_after) * 1000
    assert "503" in end.message and "overloaded" in end.message
    a.submit(req(2, 4))  # the next one goes through
    end = await sink.wait_end(2)
    assert (end.kind, end.reason) == ("finish", "length"), end


async def cancel_reaches_server(a: HttpAdapter, sink: RecordingSink, fake: FakeEngine) -> None:
    a.submit(req(1, 1000))
    await wait_until(lambda: len(sink.tokens[1]) >= 3, 5, "three tokens")
    a.abort(1)
    await wait_until(lambda: fake.canceled, 5, "the fake to see the client go")
    assert fake.seen[0].canceled and not fake.seen[0].finished
    a.submit(req(2, 3))  # the adapter goes on serving
    end = await sink.wait_end(2)
    assert end.kind == "finish"
    assert sink.end_of(1) is None  # an aborted request reports nothing


def connection_refused(cls: type[HttpAdapter]) -> None:
    """A running engine that vanishes: the request fails WORKER_RESET, the engine is dead."""

    async def main() -> None:
        fake = await FakeEngine(_dialect(cls)).start()
        adapter, sink = adapter_for(cls, fake.url)
        try:
            await adapter.start(timeout_s=5.0)
            await fake.stop()
            adapter.submit(req(1, 4))
            end = await sink.wait_end(1)
            assert (end.kind, end.reason) == ("error", "WORKER_RESET"), end
            assert "connect" in end.message
            assert len(sink.dead) == 1
        finally:
            await adapter.stop()

    asyncio.run(main())


def not_ready_in_time(cls: type[HttpAdapter]) -> None:
    """Health says loading longer than the timeout: start fails and says why."""

    async def main() -> None:
        fake = await FakeEngine(_dialect(cls), Faults(loading_s=30)).start()
        adapter, _ = adapter_for(cls, fake.url)
        try:
            try:
                await adapter.start(timeout_s=0.3)
            except RuntimeError as e:
                assert "not ready" in str(e) and "loading" in str(e)
            else:
                raise AssertionError("start succeeded while the engine was loading")
        finally:
            await fake.stop()

    asyncio.run(main())
    # And nothing listening at all: also a clear failure.
    adapter, _ = adapter_for(cls, f"http://127.0.0.1:{free_port()}")

    async def nothing() -> None:
        try:
            await adapter.start(timeout_s=0.2)
        except RuntimeError as e:
            assert "ConnectError" in str(e)
        else:
            raise AssertionError("start succeeded with no engine")

    asyncio.run(nothing())


def _dialect(cls: type[HttpAdapter]) -> str:
    return cls.name
