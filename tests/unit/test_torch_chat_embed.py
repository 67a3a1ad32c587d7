"""The torch engine's chats and embeddings on CPU: a chat is the model's chat template (or the
default one, for a model without a template and for the ``random:`` models, which have no
tokenizer), rendered with the reply's opening; an embedding is one unit vector per input of
the model's hidden size, mean-pooled over that input's own tokens only, whatever else is in
its batch, answered once with the tokens read."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine_procs import engine_link, torch_models
from engine_procs.adapters.base import EngineRequest
from engine_procs.adapters.torch import TorchAdapter
from engine_procs.torch_batch import embed
from engine_procs.torch_engine import TorchEngineProcess
from ipc import protocol as p
from orchd.config import Replica, TorchEngine
from tests.fakes.sink import RecordingSink
from tests.support.hf import save_tiny_model

CPU = torch.device("cpu")
CHAT = [("system", "Be brief."), ("user", "hello world")]
RENDERED = "<|system|>\nBe brief.\n<|user|>\nhello world\n<|assistant|>\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def tiny() -> torch_models.Loaded:
    return torch_models.load("random:tiny", CPU, torch.float32, 0)


def close(a: list[list[float]], b: list[list[float]], tol: float = 1e-5) -> bool:
    return torch.allclose(torch.tensor(a), torch.tensor(b), atol=tol, rtol=0)


def make_engine(tmp_path: Path, loaded: torch_models.Loaded, **cfg: int) -> TorchEngineProcess:
    config = TorchEngine(device="cpu", **{"max_batch": 2, "max_seq_len": 64, **cfg})
    return TorchEngineProcess(f"ipc://{tmp_path}/engine", config, loaded, "torch-test")


@pytest.fixture
def engine(tmp_path: Path, tiny: torch_models.Loaded) -> Iterator[TorchEngineProcess]:
    proc = make_engine(tmp_path, tiny)
    yield proc
    proc.sock.close(0)
    proc.ctx.term()


def drive(engine: TorchEngineProcess) -> list[p.EngTextStep]:
    steps = []
    for _ in range(200):
        if not engine.waiting and not engine.to_embed and not len(engine.decoder):
            break
        steps.append(engine.step())
    return steps


def test_a_random_model_renders_a_chat_with_the_default_template(
    tiny: torch_models.Loaded,
) -> None:
    assert tiny.text.tokenizer is None
    assert tiny.text.render_chat(CHAT) == RENDERED
    assert tiny.text.encode_chat(CHAT) == tiny.text.encode(RENDERED)  # a byte per token


def test_a_model_without_a_template_gets_the_default_one(model_dir: Path) -> None:
    loaded = torch_models.load(f"file:{model_dir}", CPU, torch.float32, 0)
    tok = loaded.text.tokenizer
    assert tok is not None and tok.chat_template == torch_models.DEFAULT_CHAT_TEMPLATE
    assert loaded.text.render_chat(CHAT) == RENDERED
    assert loaded.text.encode_chat(CHAT) == tok.encode(RENDERED, add_special_tokens=False)


def test_a_models_own_template_is_used(model_dir: Path, tmp_path: Path) -> None:
    loaded = torch_models.load(f"file:{model_dir}", CPU, torch.float32, 0)
    tok = loaded.text.tokenizer
    assert tok is not None
    tok.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    tok.save_pretrained(tmp_path)  # a model directory whose tokenizer has a template
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (model_dir / name).exists():
            (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    own = torch_models.load(f"file:{tmp_path}", CPU, torch.float32, 0)
    want = "[system] Be brief. [user] hello world [assistant]"
    assert own.text.render_chat(CHAT) == want


def test_a_chat_its_template_refuses_fails_alone_as_invalid(
    model_dir: Path, tmp_path: Path
) -> None:
    loaded = torch_models.load(f"file:{model_dir}", CPU, torch.float32, 0)
    tok = loaded.text.tokenizer
    assert tok is not None
    tok.chat_template = (  # as Llama 2's and Mistral's templates do
        "{% for m in messages %}{% if m['role'] == 'system' %}"
        "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
        "{{ m['content'] }}{% endfor %}"
    )
    engine = make_engine(tmp_path, loaded)
    try:
        engine.handle(p.EngSubmit(1, "", seed=0, max_tokens=3, messages=CHAT))
        engine.handle(p.EngSubmit(2, "", seed=0, max_tokens=3, messages=[("user", "hello")]))
        steps = drive(engine)
    finally:
        engine.sock.close(0)
        engine.ctx.term()
    ((rid, why),) = [e for s in steps for e in s.errors]
    assert rid == 1 and "roles must alternate" in why
    assert engine_link.error_code(why) == "INVALID_PARAMS"
    assert engine_link.error_code("torch engine step failed: OOM") == "INTERNAL"
    assert [r for s in steps for r, _ in s.finished] == [2]


def test_a_chat_decodes_as_its_rendered_prompt(engine: TorchEngineProcess) -> None:
    engine.handle(p.EngSubmit(1, "", seed=0, max_tokens=6, messages=CHAT))
    engine.handle(p.EngSubmit(2, RENDERED, seed=0, max_tokens=6))
    steps = drive(engine)
    prompts = dict(pr for s in steps for pr in s.prompts)
    assert prompts == {1: len(RENDERED.encode()), 2: len(RENDERED.encode())}
    text: dict[int, str] = {}
    for s in steps:
        for rid, pieces in s.tokens:
            text[rid] = text.get(rid, "") + "".join(pieces)
    assert text[1] == text[2] and text[1]


def test_embeddings_are_unit_vectors_independent_of_their_batch(
    tiny: torch_models.Loaded,
) -> None:
    short, long = tiny.text.encode("hi"), tiny.text.encode("a much longer input text")
    vectors, n = embed(tiny.model, [short, long, short], max_seq_len=64, max_batch=8)
    assert n == 2 * len(short) + len(long)
    assert len(vectors) == 3 and all(len(v) == 64 for v in vectors)  # random:tiny's hidden size
    for v in vectors:
        assert math.isclose(math.fsum(x * x for x in v), 1.0, rel_tol=1e-5)
    assert close([vectors[0]], [vectors[2]], 1e-6)
    assert not close([vectors[0]], [vectors[1]], 1e-3)
    # Alone, or beside a longer input (padding), or one pass per input: the same vector.
    (alone,), _ = embed(tiny.model, [short], max_seq_len=64, max_batch=8)
    one_by_one, _ = embed(tiny.model, [short, long, short], max_seq_len=64, max_batch=1)
    assert close([alone], [vectors[0]])
    assert close(one_by_one, vectors)
    # max_seq_len cuts an input to its head, and counts what was read.
    cut, read = embed(tiny.model, [long], max_seq_len=2, max_batch=8)
    assert read == 2
    assert close(cut, embed(tiny.model, [long[:2]], max_seq_len=64, max_batch=8)[0])


def test_an_embedding_request_is_answered_once_outside_the_batch(
    engine: TorchEngineProcess, tiny: torch_models.Loaded
) -> None:
    inputs = ["hi", "a much longer input text", "hi"]
    engine.handle(p.EngSubmit(1, "running", seed=0, max_tokens=20))
    engine.step()  # a decode in flight: the embedding does not wait for a row
    engine.handle(p.EngSubmit(2, "", 0, 1, workload="embedding", inputs=inputs))
    engine.handle(p.EngSubmit(3, "", 0, 1, workload="embedding", inputs=["aborted"]))
    engine.handle(p.EngAbort(3))
    step = engine.step()
    assert 1 in {rid for rid, _ in step.tokens} and not step.errors
    (answer,) = engine.embedded
    want, n = embed(tiny.model, [tiny.text.encode(t) for t in inputs], max_seq_len=64, max_batch=2)
    assert answer.rid == 2 and answer.prompt_tokens == n == 2 + 24 + 2
    assert close(answer.vectors, want, 1e-6)
    assert not engine.to_embed and [r.rid for r in engine.decoder.rows] == [1]


def test_a_failed_embedding_fails_only_its_request(
    engine: TorchEngineProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    def oom(*_: object, **__: object) -> None:
        raise RuntimeError("CUDA out of memory (simulated)")

    monkeypatch.setattr("engine_procs.torch_engine.embed", oom)
    engine.handle(p.EngSubmit(1, "x", seed=0, max_tokens=3))
    engine.handle(p.EngSubmit(2, "", 0, 1, workload="embedding", inputs=["x"]))
    steps = drive(engine)
    assert [e[0] for s in steps for e in s.errors] == [2]
    assert "RuntimeError: CUDA out of memory (simulated)" in steps[0].errors[0][1]
    assert [rid for s in steps for rid, _ in s.finished] == [1]
    assert engine.embedded == []


@pytest.mark.timeout(120)
def test_chat_and_embeddings_through_the_adapter(tmp_path: Path) -> None:
    """The engine process's own loop: a chat streams, an embedding answers (usage first)."""

    async def main() -> None:
        sink = RecordingSink()
        replica = Replica(
            id="t",
            engine="torch",
            model_ref="random:tiny",
            torch=TorchEngine(device="cpu", max_batch=4, max_seq_len=64, engine_version="t"),
        )
        adapter = TorchAdapter(replica, f"ipc://{tmp_path}/engine.sock", sink)
        await adapter.start(timeout_s=90)
        try:
            assert adapter.chat and adapter.embeddings
            adapter.submit(EngineRequest(1, "", 0, 5, messages=CHAT))
            adapter.submit(EngineRequest(2, "", 0, 1, workload="embedding", inputs=["a", "bc"]))
            assert (await sink.wait_end(1, timeout=60)).reason == "length"
            assert len(sink.tokens[1]) == 5 and sink.usage[1] == len(RENDERED.encode())
            assert (await sink.wait_end(2, timeout=60)).kind == "embedding"
            assert [len(v) for v in sink.vectors[2]] == [64, 64]
            assert [k for k, rid in sink.calls if rid == 2] == ["on_usage", "on_embedding"]
            assert sink.usage[2] == 3
        finally:
            await adapter.stop()

    asyncio.run(main())
