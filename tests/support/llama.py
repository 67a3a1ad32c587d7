"""A real llama.cpp server for tests: a tiny GGUF model made on the spot, and the command line
that starts ``llama-server`` on it.

The model is Llama-architecture with random weights and a real byte-level BPE tokenizer (trained
with ``tokenizers`` on text written here), written with the ``gguf`` package; nothing comes from
a hub. Two tweaks make its output usable in assertions, without changing how llama.cpp runs it:

- every token embedding carries a constant in dimension 0 that no layer writes to (the rows of
  ``attn_output`` and ``ffn_down`` that would are zero), so the final hidden state always has it;
- the output rows of the end-of-sequence token, of the special tokens and of every token that is
  not printable ASCII weigh that dimension by a large negative number.

So the model never ends a stream early and every token it samples is a non-empty text piece: a
request for ``n`` tokens streams exactly ``n`` pieces. The prompt is tokenized by llama.cpp
(``gpt-2`` pre-tokenizer, no BOS added), the same as :func:`prompt_token_count` here.

Fixtures (registered for every test by ``tests/conftest.py``): ``llama_server`` (the binary,
built by ``make llama-server``), ``llama_model`` and ``llama_model_b`` (two GGUF files with
different weights, made once per session) and ``llama_server_command`` (the
``[replicas.endpoint] command`` template that starts the server on ``{model_path}`` and
``{port}``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest

from tests.support.llama_build import server_path

TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello orchd: tokens stream from a real engine",
    "a cancel frees the slot; a crash restarts the server; a reload swaps the model",
    "once upon a time there was a tiny model with random weights",
]
VOCAB_SIZE = 384
SPECIALS = ["<s>", "</s>"]  # BOS, EOS
N_EMBD = 192
N_HEAD = 4
N_HEAD_KV = 2
N_FF = 512
N_LAYER = 3
N_CTX_TRAIN = 16384
MARK = 4.0  # the constant in dimension 0 of every embedding
BAN = -200.0  # what a banned token's output row weighs it by

# Slots and context for the server: each slot gets N_CTX // N_SLOTS tokens (a prompt plus at
# most that many generated ones).
N_SLOTS = 2
N_CTX = 16384
SLOT_CTX = N_CTX // N_SLOTS


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet (printable stand-ins for the 256 bytes), reversed."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def token_bytes(token: str) -> bytes:
    dec = _byte_decoder()
    return bytes(dec[c] for c in token)


@functools.cache
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIALS,
        show_progress=False,
    )
    tok.train_from_iterator(TEXT * 10, trainer)
    return str(tok.to_str())


def prompt_token_count(prompt: str) -> int:
    """How many tokens llama.cpp makes of ``prompt`` with this model's tokenizer."""
    from tokenizers import Tokenizer

    return len(Tokenizer.from_str(_tokenizer_json()).encode(prompt).ids)


def _vocab() -> tuple[list[str], list[str]]:
    spec = json.loads(_tokenizer_json())
    vocab: dict[str, int] = spec["model"]["vocab"]
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, merges


def _printable(token: str) -> bool:
    raw = token_bytes(token)
    return bool(raw) and all(0x20 <= b < 0x7F for b in raw)


def make_gguf(path: Path, seed: int) -> Path:
    """Write a tiny random-weight Llama with this module's tokenizer to ``path``."""
    import gguf

    tokens, merges = _vocab()
    bos, eos = tokens.index(SPECIALS[0]), tokens.index(SPECIALS[1])
    n_vocab, head_dim = len(tokens), N_EMBD // N_HEAD
    rng = np.random.default_rng(seed)

    def rand(*shape: int, scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(f"orchd-test-tiny-llama-{seed}")
    w.add_context_length(N_CTX_TRAIN)
    w.add_embedding_length(N_EMBD)
    w.add_block_count(N_LAYER)
    w.add_feed_forward_length(N_FF)
    w.add_head_count(N_HEAD)
    w.add_head_count_kv(N_HEAD_KV)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    special = gguf.TokenType.CONTROL
    w.add_token_types([special if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(bos)
    w.add_eos_token_id(eos)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)

    embd = rand(n_vocab, N_EMBD, scale=1.0)
    embd[:, 0] = MARK
    w.add_tensor("token_embd.weight", embd)
    kv = N_HEAD_KV * head_dim
    for i in range(N_LAYER):
        out = rand(N_EMBD, N_EMBD, scale=0.5 / np.sqrt(N_EMBD))
        down = rand(N_EMBD, N_FF, scale=0.5 / np.sqrt(N_FF))
        out[0, :] = 0.0  # nothing writes to dimension 0 ...
        down[0, :] = 0.0
        layer = {
            "attn_norm": np.ones(N_EMBD, np.float32),
            "attn_q": rand(N_EMBD, N_EMBD, scale=1.0 / np.sqrt(N_EMBD)),
            "attn_k": rand(kv, N_EMBD, scale=1.0 / np.sqrt(N_EMBD)),
            "attn_v": rand(kv, N_EMBD, scale=1.0 / np.sqrt(N_EMBD)),
            "attn_output": out,
            "ffn_norm": np.ones(N_EMBD, np.float32),
            "ffn_gate": rand(N_FF, N_EMBD, scale=1.0 / np.sqrt(N_EMBD)),
            "ffn_up": rand(N_FF, N_EMBD, scale=1.0 / np.sqrt(N_EMBD)),
            "ffn_down": down,
        }
        for name, tensor in layer.items():
            w.add_tensor(f"blk.{i}.{name}.weight", tensor)
    w.add_tensor("output_norm.weight", np.ones(N_EMBD, np.float32))
    head = rand(n_vocab, N_EMBD, scale=1.0)
    head[:, 0] = 0.0
    for i, t in enumerate(tokens):  # ... so this column bans what it weighs negatively
        if i in (bos, eos) or not _printable(t):
            head[i, :] = 0.0
            head[i, 0] = BAN
    w.add_tensor("output.weight", head)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def server_command(binary: Path) -> list[str]:
    """``llama-server`` on ``{model_path}`` and ``{port}``: one thread (the machine has two
    cores for everything), ``N_SLOTS`` slots, ``/metrics`` and ``/slots`` on."""
    return [
        str(binary),
        "--model", "{model_path}",
        "--host", "127.0.0.1",
        "--port", "{port}",
        "--ctx-size", str(N_CTX),
        "--parallel", str(N_SLOTS),
        "--threads", "1",
        "--threads-batch", "1",
        "--metrics",
        "--slots",
        "--no-webui",
    ]  # fmt: skip


@pytest.fixture(scope="session")
def llama_server() -> Path:
    path = server_path()
    if not path.exists():
        pytest.fail(
            f"llama-server is not built ({path}): run `make llama-server` "
            "(`make test` builds it first)",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def llama_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gguf(tmp_path_factory.mktemp("gguf") / "tiny-a.gguf", seed=1)


@pytest.fixture(scope="session")
def llama_model_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gguf(tmp_path_factory.mktemp("gguf") / "tiny-b.gguf", seed=2)


@pytest.fixture(scope="session")
def llama_server_command(llama_server: Path) -> list[str]:
    return server_command(llama_server)
