"""What the torch engine loads: random weights by name, a transformers model directory with
its tokenizer (made here: nothing comes from a hub), and text streamed token by token."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engine_procs import torch_models
from engine_procs.torch_batch import BatchDecoder, NewRequest
from tests.support.hf import save_tiny_model

CPU = torch.device("cpu")
TEXT = 'héllo wörld, "quoted" \\ back\nslash 日本語 🙂 the end'


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("model"))


def test_streamed_text_is_the_text_even_where_a_token_splits_a_character(
    model_dir: Path,
) -> None:
    loaded = torch_models.load(f"file:{model_dir}", CPU, torch.float32, 0)
    ids = loaded.text.encode(TEXT)
    stream = loaded.text.stream()
    pieces = [stream.push(t) for t in ids]
    assert "".join(pieces) == TEXT
    assert "" in pieces  # byte-level pieces of 日本語 and 🙂 wait for the rest of their bytes
    assert all("\ufffd" not in p for p in pieces)


def test_a_model_directory_loads_with_its_eos(model_dir: Path) -> None:
    loaded = torch_models.load(f"file:{model_dir}", CPU, torch.float32, 0)
    assert loaded.name == model_dir.name
    assert loaded.eos_ids == {loaded.text.tokenizer.eos_token_id}  # type: ignore[union-attr]
    d = BatchDecoder(loaded.model, max_batch=2, max_seq_len=64, eos_ids=loaded.eos_ids)
    out = d.add([NewRequest(1, loaded.text.encode("hello"), 5)])
    while len(d):
        out += d.step()
    assert 1 <= len(out) <= 5
    assert out[-1][2] in ("stop", "length")


def test_random_weights_are_seeded_and_use_the_synthetic_vocabulary() -> None:
    a = torch_models.load("random:tiny", CPU, torch.float32, weights_seed=3)
    b = torch_models.load("random:tiny", CPU, torch.float32, weights_seed=3)
    c = torch_models.load("random:tiny", CPU, torch.float32, weights_seed=4)
    wa, wb, wc = (next(x.model.parameters()) for x in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert a.text.encode("AB") == [65, 66]
    stream = a.text.stream()
    assert [stream.push(t) for t in (1, 2, 9)] == ['"', "\\", " ba"]
    assert a.eos_ids == frozenset() and a.text.vocab_size == 512


@pytest.mark.parametrize(
    ("ref", "error", "match"),
    [
        ("random:huge", ValueError, "no random config 'huge'; known: tiny, small, 1b, 8b"),
        ("mock:tiny", ValueError, "loads file:<directory> or random:"),
        ("file:/nonexistent/model", OSError, "not a directory"),
    ],
)
def test_what_cannot_load_says_why(ref: str, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        torch_models.load(ref, CPU, torch.float32, 0)


def test_device_and_dtype_choices() -> None:
    auto = torch_models.pick_device("auto")
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert torch_models.pick_dtype("auto", CPU) is torch.float32
    assert torch_models.pick_dtype("auto", torch.device("cuda")) is torch.bfloat16
    assert torch_models.pick_dtype("float16", CPU) is torch.float16
    with pytest.raises(ValueError, match="unknown torch dtype 'float7'"):
        torch_models.pick_dtype("float7", CPU)
