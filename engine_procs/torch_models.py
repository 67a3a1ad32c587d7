"""What the built-in torch engine loads: a transformers model from a local directory, or random
weights on a named config (nothing is ever fetched from a hub), and the text side of it.

``random:<name>`` configs have Llama's shape at a few sizes, so that a GPU benchmark runs a
real decoder's arithmetic with no weights on disk. Their tokens mean nothing; their text comes
from the mock engine's synthetic vocabulary. A ``file:`` directory with a tokenizer uses it.

A chat is rendered with the tokenizer's chat template (``apply_chat_template`` with
``add_generation_prompt=True``) and tokenized without adding special tokens (a template writes
its own, as vLLM does for chats). A model with no template of its own, and the ``random:``
models (no tokenizer at all), use :data:`DEFAULT_CHAT_TEMPLATE`, the mock engine's shape:
each turn as ``<|role|>\ncontent\n``, then ``<|assistant|>\n``.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any

# Never reach for a hub, whatever the environment says (set before transformers is imported).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import jinja2  # noqa: E402
import torch  # noqa: E402
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
)

from engine_procs.mock_engine import vocab  # noqa: E402

# The chat template of a model that has none (Jinja, as transformers renders templates).
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Llama-shaped configs, by name: (hidden, intermediate, layers, heads, kv heads, vocab).
RANDOM_CONFIGS: dict[str, tuple[int, int, int, int, int, int]] = {
    "tiny": (64, 128, 2, 4, 2, 512),  # tests, on CPU
    "small": (512, 1408, 8, 8, 8, 32_000),  # ~60M parameters
    "1b": (2048, 5632, 22, 32, 4, 32_000),  # TinyLlama-1.1B's shape
    "8b": (4096, 14336, 32, 32, 8, 128_256),  # Llama-3-8B's shape
}


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown torch dtype {name!r}")
    return dtype


class Text:
    """Token ids to and from text, with incremental detokenization per request."""

    def __init__(self, tokenizer: Any | None, vocab_size: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._words = None if tokenizer is not None else vocab(vocab_size)

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is not None:
            ids: list[int] = self.tokenizer.encode(prompt, add_special_tokens=True)
            return ids
        return [b % self.vocab_size for b in prompt.encode()]

    def render_chat(self, messages: list[tuple[str, str]]) -> str:
        """The chat as the model reads it, with the reply's opening (see the module
        docstring)."""
        turns = [{"role": role, "content": content} for role, content in messages]
        if self.tokenizer is not None:
            text: str = self.tokenizer.apply_chat_template(
                turns, add_generation_prompt=True, tokenize=False
            )
            return text
        return _default_template().render(messages=turns, add_generation_prompt=True)

    def encode_chat(self, messages: list[tuple[str, str]]) -> list[int]:
        text = self.render_chat(messages)
        if self.tokenizer is not None:
            ids: list[int] = self.tokenizer.encode(text, add_special_tokens=False)
            return ids
        return self.encode(text)

    def stream(self) -> Detokenizer:
        return Detokenizer(self)


class Detokenizer:
    """One request's text, token by token. A token that ends inside a multi-byte character
    yields "" and the character comes whole with the token that completes it (the prefix /
    read offsets of vLLM's and TGI's detokenizers)."""

    def __init__(self, text: Text) -> None:
        self.text = text
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def push(self, token: int) -> str:
        words = self.text._words
        if words is not None:
            return words[token] if token < len(words) else ""
        tok = self.text.tokenizer
        assert tok is not None
        self.ids.append(token)
        before = tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return str(after[len(before) :])
        return ""

    def flush(self) -> str:
        """What is still held back when the request ends (bytes that never made a character
        come out as U+FFFD), so that the pieces always add up to the decoded text."""
        tok = self.text.tokenizer
        if tok is None or self.read == len(self.ids):
            return ""
        before = tok.decode(self.ids[self.prefix : self.read], skip_special_tokens=True)
        after = tok.decode(self.ids[self.prefix :], skip_special_tokens=True)
        self.prefix = self.read = len(self.ids)
        return str(after[len(before) :])


@functools.cache
def _default_template() -> jinja2.Template:
    """:data:`DEFAULT_CHAT_TEMPLATE` for a model with no tokenizer, compiled as transformers
    compiles chat templates (a sandbox; blocks' whitespace kept)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(DEFAULT_CHAT_TEMPLATE)


@dataclass(slots=True)
class Loaded:
    model: PreTrainedModel
    text: Text
    eos_ids: frozenset[int]
    name: str


def load(model_ref: str, device: torch.device, dtype: torch.dtype, weights_seed: int) -> Loaded:
    """The model a ``model_ref`` names, on ``device``; raises ValueError or OSError saying why not."""
    scheme, _, rest = model_ref.partition(":")
    if scheme == "random":
        return _random(rest, device, dtype, weights_seed)
    if scheme == "file" or model_ref.startswith("/"):
        return _from_dir(rest.removeprefix("//") if scheme == "file" else model_ref, device, dtype)
    raise ValueError(
        f"the torch engine loads file:<directory> or random:<{'|'.join(RANDOM_CONFIGS)}>,"
        f" not {model_ref!r}"
    )


def _random(name: str, device: torch.device, dtype: torch.dtype, seed: int) -> Loaded:
    try:
        hidden, inter, layers, heads, kv_heads, vocab_size = RANDOM_CONFIGS[name]
    except KeyError:
        raise ValueError(f"no random config {name!r}; known: {', '.join(RANDOM_CONFIGS)}") from None
    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab_size,
        max_position_embeddings=131_072,
        # Wider than a trained model's init so that logits are decisive: greedy decoding
        # then does not flip on rounding between a batch of one and a batch of many.
        initializer_range=0.5 if name == "tiny" else 0.02,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # drawn in place, at its size: an 8b model never exists twice
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return Loaded(model.eval(), Text(None, vocab_size), frozenset(), f"random:{name}")


def _from_dir(path: str, device: torch.device, dtype: torch.dtype) -> Loaded:
    if not os.path.isdir(path):
        raise OSError(f"{path}: not a directory holding a transformers model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    torch.nn.Module.to(model, device)
    model.eval()
    has_tokenizer = any(
        os.path.exists(os.path.join(path, f))
        for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    )
    tokenizer = (
        AutoTokenizer.from_pretrained(path, local_files_only=True) if has_tokenizer else None
    )
    if tokenizer is not None and not tokenizer.chat_template:
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE  # so that every model takes a chat
    eos = model.generation_config.eos_token_id if model.generation_config else None
    if eos is None:
        eos = model.config.eos_token_id
    eos_ids = frozenset([eos] if isinstance(eos, int) else (eos or []))
    vocab_size = int(model.config.vocab_size)
    return Loaded(model, Text(tokenizer, vocab_size), eos_ids, os.path.basename(path.rstrip("/")))
