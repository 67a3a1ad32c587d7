"""The mock engine's chat template and embeddings: the template's exact text and what follows
from it (tokens, prompt length), and embeddings that are deterministic unit vectors of the
configured dimension, one per input in order; then both through the mock adapter's process."""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from engine_procs.adapters.base import EngineRequest
from engine_procs.adapters.mock import MockAdapter
from engine_procs.mock_engine import MockEngineProcess, embed, prompt_tokens, render_chat
from ipc import protocol as p
from orchd.config import MockEngine, Replica
from tests.fakes.sink import RecordingSink

CHAT = [("system", "Be brief."), ("user", "Hi")]


def later() -> float:
    """A step time by which every request submitted so far is due."""
    return time.monotonic() + 3600.0


def test_the_chat_template_is_the_documented_text() -> None:
    assert render_chat(CHAT) == "<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"
    assert render_chat([]) == "<|assistant|>\n"
    # <|system|> 6, Be 1, brief 2, . 1, <|user|> 5, Hi 1, <|assistant|> 7: the docstring's 23.
    assert prompt_tokens(render_chat(CHAT)) == 23


def test_embeddings_are_deterministic_unit_vectors_of_the_configured_dimension() -> None:
    a = embed("mock-1.0", "mock:tiny", "hello", 64)
    assert len(a) == 64
    assert math.isclose(math.fsum(x * x for x in a), 1.0, rel_tol=1e-12)
    assert embed("mock-1.0", "mock:tiny", "hello", 64) == a
    assert embed("mock-1.0", "mock:tiny", "hello!", 64) != a  # another text
    assert embed("mock-2.0", "mock:tiny", "hello", 64) != a  # another engine version
    assert embed("mock-1.0", "mock:other", "hello", 64) != a  # another model
    assert len(embed("mock-1.0", "mock:tiny", "", 7)) == 7


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[MockEngineProcess]:
    proc = MockEngineProcess(
        f"ipc://{tmp_path}/engine", MockEngine(ttft_ms=0, embedding_dim=16), "mock:tiny"
    )
    yield proc
    proc.sock.close(0)
    proc.ctx.term()


def test_an_embedding_request_answers_once_in_input_order(engine: MockEngineProcess) -> None:
    inputs = ["first text", "second, longer text", "first text", ""]
    engine.handle(p.EngSubmit(1, "", 0, 1, workload="embedding", inputs=inputs))
    step = engine.step(later())
    assert step.tokens == [] and step.finished == [] and step.prompts == []
    (answer,) = engine.embedded
    assert answer.rid == 1
    assert answer.vectors == [embed("mock-1.0", "mock:tiny", t, 16) for t in inputs]
    assert answer.vectors[0] == answer.vectors[2] != answer.vectors[1]
    assert answer.prompt_tokens == sum(prompt_tokens(t) for t in inputs) == 3 + 6 + 3 + 0
    assert not engine.reqs  # done: nothing more comes for it
    engine.embedded.clear()
    engine.step(later())
    assert engine.embedded == []


def test_an_aborted_embedding_never_answers(engine: MockEngineProcess) -> None:
    engine.handle(p.EngSubmit(1, "", 0, 1, workload="embedding", inputs=["x"]))
    engine.handle(p.EngAbort(1))
    engine.step(later())
    assert engine.embedded == []


def test_a_chat_decodes_as_its_rendered_prompt(engine: MockEngineProcess) -> None:
    engine.handle(p.EngSubmit(1, "", 7, 5, messages=CHAT))
    engine.handle(p.EngSubmit(2, render_chat(CHAT), 7, 5))
    tokens: dict[int, list[int]] = {1: [], 2: []}
    prompts: dict[int, int] = {}
    while engine.reqs:
        step = engine.step(later())
        prompts.update(step.prompts)
        for rid, toks in step.tokens:
            tokens[rid] += toks
    assert len(tokens[1]) == 5 and tokens[1] == tokens[2]
    assert prompts == {1: 23, 2: 23}


@contextlib.asynccontextmanager
async def running(tmp_path: Path, **mock: Any) -> AsyncIterator[tuple[MockAdapter, RecordingSink]]:
    sink = RecordingSink()
    replica = Replica(id="r", engine="mock", mock=MockEngine(**mock))
    adapter = MockAdapter(replica, f"ipc://{tmp_path}/engine.sock", sink)
    await adapter.start(timeout_s=30)
    try:
        yield adapter, sink
    finally:
        await adapter.stop()


@pytest.mark.timeout(60)
def test_chat_and_embeddings_through_the_adapter(tmp_path: Path) -> None:
    inputs = ["a", "b c", "a"]

    async def main() -> None:
        async with running(tmp_path, itl_ms=1, embedding_dim=8) as (a, sink):
            assert a.chat and a.embeddings
            a.submit(EngineRequest(1, "", 0, 1, workload="embedding", inputs=inputs))
            a.submit(EngineRequest(2, "", 7, 4, messages=CHAT))
            a.submit(EngineRequest(3, render_chat(CHAT), 7, 4))
            end = await sink.wait_end(1)
            assert end.kind == "embedding"
            assert sink.vectors[1] == [embed("mock-1.0", "mock:tiny", t, 8) for t in inputs]
            assert [k for k, rid in sink.calls if rid == 1] == ["on_usage", "on_embedding"]
            assert sink.usage[1] == sum(prompt_tokens(t) for t in inputs)
            for rid in (2, 3):
                assert (await sink.wait_end(rid)).reason == "length"
            assert sink.tokens[2] == sink.tokens[3] and len(sink.tokens[2]) == 4
            assert sink.usage[2] == sink.usage[3] == 23

    asyncio.run(main())
