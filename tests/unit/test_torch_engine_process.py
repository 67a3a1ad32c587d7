"""The torch engine process's turn, without its socket: submits wait for a free row, aborts
free it (queued or running), a failed step fails exactly the requests it held, and every
request's pieces add up to its decoded text."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine_procs import torch_models
from engine_procs.torch_engine import TorchEngineProcess
from ipc import protocol as p
from orchd.config import TorchEngine
from tests.support.hf import save_tiny_model

CPU = torch.device("cpu")


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[TorchEngineProcess]:
    loaded = torch_models.load("random:tiny", CPU, torch.float32, 0)
    cfg = TorchEngine(device="cpu", max_batch=2, max_seq_len=64)
    proc = TorchEngineProcess(f"ipc://{tmp_path}/engine", cfg, loaded, "torch-test")
    yield proc
    proc.sock.close(0)
    proc.ctx.term()


def drive(engine: TorchEngineProcess, turns: int = 200) -> list[p.EngTextStep]:
    steps = []
    for _ in range(turns):
        if not engine.waiting and not len(engine.decoder):
            break
        steps.append(engine.step())
    return steps


def test_requests_wait_for_a_row_and_all_finish(engine: TorchEngineProcess) -> None:
    for rid in range(1, 4):
        engine.handle(p.EngSubmit(rid, f"prompt {rid}", seed=rid, max_tokens=5))
    first = engine.step()
    assert {rid for rid, _ in first.tokens} == {1, 2}  # max_batch = 2: the third waits
    assert list(engine.waiting) == [3]
    steps = [first, *drive(engine)]
    counts: dict[int, int] = {}
    for s in steps:
        for rid, pieces in s.tokens:
            counts[rid] = counts.get(rid, 0) + len(pieces)
    assert counts == {1: 5, 2: 5, 3: 5}
    assert sorted(rid for s in steps for rid, _ in s.finished) == [1, 2, 3]
    assert not engine.text


def test_the_prefill_step_reports_the_prompt_as_the_engine_reads_it(
    engine: TorchEngineProcess,
) -> None:
    # random:tiny encodes a byte per token; max_seq_len 64 less 10 output tokens leaves 54.
    engine.handle(p.EngSubmit(1, "héllo", seed=0, max_tokens=10))
    engine.handle(p.EngSubmit(2, "x" * 200, seed=0, max_tokens=10))
    engine.handle(p.EngSubmit(3, "", seed=0, max_tokens=10))
    first = engine.step()
    assert first.prompts == [(1, 6), (2, 54)]  # 3 waits for a row: reported when it gets one
    later = drive(engine)
    assert [pr for s in later for pr in s.prompts] == [(3, 0)]
    admitted = next(s for s in later if s.prompts)
    assert 3 in {rid for rid, _ in admitted.tokens}  # in the step with its first token


def test_abort_frees_a_queued_or_running_request(engine: TorchEngineProcess) -> None:
    for rid in (1, 2, 3):
        engine.handle(p.EngSubmit(rid, "x", seed=0, max_tokens=50))
    engine.step()
    engine.handle(p.EngAbort(1))  # running
    engine.handle(p.EngAbort(3))  # still waiting
    assert [r.rid for r in engine.decoder.rows] == [2]
    assert not engine.waiting and set(engine.text) == {2}
    steps = drive(engine)
    assert {rid for s in steps for rid, _ in s.tokens} == {2}


def test_a_failed_step_fails_what_it_held_and_the_engine_goes_on(
    engine: TorchEngineProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.handle(p.EngSubmit(1, "a", seed=0, max_tokens=50))
    engine.step()
    engine.handle(p.EngSubmit(2, "b", seed=0, max_tokens=50))

    def oom(*_: object) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr(engine.decoder, "step", oom)
    failed = engine.step()
    assert sorted(rid for rid, _ in failed.errors) == [1, 2]
    assert "RuntimeError: CUDA out of memory (simulated)" in failed.errors[0][1]
    assert len(engine.decoder) == 0 and not engine.text
    monkeypatch.undo()
    engine.handle(p.EngSubmit(3, "c", seed=0, max_tokens=3))
    assert [rid for s in drive(engine) for rid, _ in s.finished] == [3]


def test_pieces_add_up_to_the_decoded_text(tmp_path: Path) -> None:
    model = save_tiny_model(tmp_path / "m")
    loaded = torch_models.load(f"file:{model}", CPU, torch.float32, 0)
    cfg = TorchEngine(device="cpu", max_batch=4, max_seq_len=128)
    engine = TorchEngineProcess(f"ipc://{tmp_path}/engine", cfg, loaded, "v")
    ids: dict[int, list[int]] = {}
    emit = engine._emit

    def record(out: p.EngTextStep, emitted: list[tuple[int, int, str | None]]) -> None:
        for rid, token, _ in emitted:
            ids.setdefault(rid, []).append(token)
        emit(out, emitted)

    engine._emit = record  # type: ignore[method-assign]
    try:
        for rid in range(1, 5):  # a random model emits byte tokens that make no character
            engine.handle(p.EngSubmit(rid, "hello", seed=rid, max_tokens=30, temperature=1.0))
        steps = drive(engine)
    finally:
        engine.sock.close(0)
        engine.ctx.term()
    text: dict[int, str] = {}
    for s in steps:
        for rid, pieces in s.tokens:
            text[rid] = text.get(rid, "") + "".join(pieces)
    tok = loaded.text.tokenizer
    assert tok is not None and sorted(text) == [1, 2, 3, 4]
    for rid, t in text.items():
        assert t == tok.decode(ids[rid], skip_special_tokens=True)
    assert any("\ufffd" in t for t in text.values())  # the held-back bytes came out at the end
