"""The mock engine: a separate process that decodes like an LLM engine, minus the model.

It batches like a real engine (one step emits the next token of every running request),
honours time-to-first-token and inter-token latency (or runs unthrottled with ``itl_ms = 0``),
is seeded-deterministic (same prompt, seed, max_tokens and engine_version give the same token
ids), and injects faults from its config only: crash after N tokens, stall, engine error.

It counts prompts with its own tokenizer (:func:`prompt_tokens`), so that usage accounting
sees a prompt length as a real engine reports one. A prompt splits into pieces: each run of
word characters (letters, digits, underscore: the regex ``\\w+``) is one piece, each other
non-space character (punctuation, symbols, emoji) a piece of its own; whitespace only
separates. A word costs one token per started 4 characters (code points; a mock vocabulary
word has at most 4 letters), any other piece 1. So ``"Hello, world!"`` is ``Hello`` 2 + ``,``
1 + ``world`` 2 + ``!`` 1 = 6 tokens, and the empty prompt 0. The count goes out in the
request's first step (``EngStep.prompts``), before its first token.

A chat (``EngSubmit.messages``) is rendered with the mock's own chat template, and the
rendered text is then the prompt (its tokens, its seed and its length all follow from it):
each turn as ``<|role|>\ncontent\n``, then ``<|assistant|>\n`` for the reply
(:func:`render_chat`). So ``[("system", "Be brief."), ("user", "Hi")]`` renders as
``"<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\n"``, 23 prompt tokens: each
``<|role|>`` is ``<``, ``|``, ``|``, ``>`` (4) and its role word (system 2, user 1,
assistant 3), then ``Be`` 1 + ``brief`` 2 + ``.`` 1 and ``Hi`` 1.

An embedding request (``workload = "embedding"``) answers, after the usual time to first
token, with one ``EngEmbedding``: per input a unit-norm vector of ``embedding_dim`` floats
drawn from a generator seeded by a sha256 of (engine_version, model, input text)
(:func:`embed`), so the same text always gets the same vector and different texts different
ones; its ``prompt_tokens`` is the sum of the inputs' counts by :func:`prompt_tokens`. The
fault-injection settings apply to token generation only.

Run by the mock adapter as ``python -m engine_procs.mock_engine ADDR CONFIG_JSON``; it talks
over a ZeroMQ PAIR socket with tiny high-water marks, so a supervisor that stops reading
stalls the engine instead of letting steps pile up.
"""

from __future__ import annotations

import hashlib
import heapq
import math
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import msgspec
import zmq

from engine_procs import engine_link
from ipc import protocol as p
from orchd.config import MockEngine

# A vocabulary with the awkward cases a real tokenizer produces: quotes, backslashes,
# newlines, multi-byte UTF-8, leading spaces.
_SPECIAL = ["\n", '"', "\\", "é", "日本", " 🙂", "\t", "</s>"]
_ONSETS = ["", "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v"]
_NUCLEI = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]


def vocab(size: int) -> list[str]:
    words = list(_SPECIAL)
    i = 0
    while len(words) < size:
        on = _ONSETS[i % len(_ONSETS)]
        nu = _NUCLEI[(i // len(_ONSETS)) % len(_NUCLEI)]
        co = _ONSETS[(i // (len(_ONSETS) * len(_NUCLEI))) % len(_ONSETS)]
        words.append(" " + on + nu + co)
        i += 1
    return words[:size]


_PIECES = re.compile(r"\w+|[^\w\s]")
WORD_UNIT = 4  # characters per token of a word piece: the mock vocabulary's longest letters


def prompt_tokens(prompt: str) -> int:
    """The prompt's length in the mock engine's tokens (see the module docstring)."""
    return sum(-(-len(piece) // WORD_UNIT) for piece in _PIECES.findall(prompt))


def render_chat(messages: list[tuple[str, str]]) -> str:
    """The mock's chat template (see the module docstring)."""
    turns = "".join(f"<|{role}|>\n{content}\n" for role, content in messages)
    return turns + "<|assistant|>\n"


def embed(engine_version: str, model: str, text: str, dim: int) -> list[float]:
    """The mock's embedding of ``text``: a unit vector that depends on nothing else."""
    key = f"{engine_version}\0{model}\0{text}"
    h = hashlib.sha256(key.encode()).digest()
    rng = random.Random(int.from_bytes(h[:16], "little"))
    v = [rng.gauss(0.0, 1.0) for _ in range(max(1, dim))]
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


def request_rng(
    engine_version: str, seed: int, prompt: str, max_tokens: int, model: str = ""
) -> random.Random:
    key = f"{engine_version}\0{model}\0{seed}\0{max_tokens}\0{prompt}"
    h = hashlib.sha256(key.encode()).digest()
    return random.Random(int.from_bytes(h[:16], "little"))


def load_model(model_ref: str) -> str:
    """What the mock "loads": a ``file:`` model must exist and is hashed (its bytes shape the
    tokens, so a reload to another file really changes the output); other refs by name."""
    if model_ref.startswith("file:"):
        with open(model_ref[5:], "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    return model_ref


@dataclass(slots=True)
class _Req:
    rid: int
    rng: random.Random
    max_tokens: int
    due: float
    prompt_tokens: int = 0
    produced: int = 0
    queued: bool = False  # has a live entry in the due heap
    inputs: list[str] | None = None  # an embedding request's texts


class MockEngineProcess:
    def __init__(self, addr: str, cfg: MockEngine, model: str = "") -> None:
        self.cfg = cfg
        self.model = model
        self.ctx, self.sock = engine_link.connect(addr)
        self.reqs: dict[int, _Req] = {}
        self.due: list[tuple[float, int]] = []  # (due time, rid): a heap
        self.embedded: list[p.EngEmbedding] = []  # answers made by step(), not yet sent

    def run(self) -> None:
        cfg = self.cfg
        self.sock.send(p.encode(p.EngReady(cfg.engine_version, cfg.vocab_size, os.getpid())))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        due = self.due
        while True:
            if due:
                wait = max(0.0, due[0][0] - time.monotonic())
                timeout: int | None = math.ceil(wait * 1000.0)
            else:
                timeout = None  # idle (or every request stalled): block until a message
            if poller.poll(timeout):
                for msg in engine_link.waiting(self.sock):
                    self.handle(msg)
            step = self.step(time.monotonic())
            if step.tokens or step.finished or step.errors or step.prompts:
                step.t_ns = time.monotonic_ns()
                self.sock.send(p.encode(step))  # blocks when the supervisor is not reading
            for answer in self.embedded:
                self.sock.send(p.encode(answer))
            self.embedded.clear()

    def step(self, now: float) -> p.EngStep:
        """One engine step: the next token(s) of every request that is due."""
        cfg = self.cfg
        itl = cfg.itl_ms / 1000.0
        step = p.EngStep([])
        due = self.due
        ready = []
        while due and due[0][0] <= now:
            _, rid = heapq.heappop(due)
            r = self.reqs.get(rid)
            if r is not None and r.queued:
                ready.append(r)
        for r in ready:
            r.queued = False
            if r.inputs is not None:  # an embedding: all of it at once, then it is done
                self.embedded.append(self._embedding(r.rid, r.inputs))
                del self.reqs[r.rid]
                continue
            if r.produced == 0:  # its first step: say how long its prompt was
                step.prompts.append((r.rid, r.prompt_tokens))
            n = cfg.tokens_per_step
            if itl > 0:
                # Catch up on whole intervals missed, as an engine under load would.
                n = max(1, min(64, int((now - r.due) / itl) + 1))
            # Never step past a fault point: the fault happens exactly at its token.
            stop = min(
                [r.max_tokens]
                + [
                    t
                    for t in (
                        cfg.stall_after_tokens,
                        cfg.error_after_tokens,
                        cfg.crash_after_tokens,
                    )
                    if t > r.produced
                ]
            )
            n = min(n, stop - r.produced)
            toks = [r.rng.randrange(cfg.vocab_size) for _ in range(n)]
            r.produced += n
            r.due = r.due + itl * n if itl > 0 else now
            step.tokens.append((r.rid, toks))
            if cfg.error_after_tokens and r.produced >= cfg.error_after_tokens:
                step.errors.append((r.rid, "mock engine error (fault injection)"))
                del self.reqs[r.rid]
            elif r.produced >= r.max_tokens:
                step.finished.append((r.rid, "length"))
                del self.reqs[r.rid]
            elif not (cfg.stall_after_tokens and r.produced >= cfg.stall_after_tokens):
                self._schedule(r)  # (a stalled request is never scheduled again)
            if cfg.crash_after_tokens and r.produced >= cfg.crash_after_tokens:
                step.t_ns = time.monotonic_ns()
                self.sock.send(p.encode(step))
                sys.stderr.write("mock engine: crashing (fault injection)\n")
                sys.stderr.flush()
                os._exit(3)
        return step

    def _schedule(self, r: _Req) -> None:
        r.queued = True
        heapq.heappush(self.due, (r.due, r.rid))

    def _embedding(self, rid: int, inputs: list[str]) -> p.EngEmbedding:
        cfg = self.cfg
        vectors = [embed(cfg.engine_version, self.model, t, cfg.embedding_dim) for t in inputs]
        return p.EngEmbedding(rid, vectors, sum(prompt_tokens(t) for t in inputs))

    def handle(self, msg: msgspec.Struct) -> None:
        if isinstance(msg, p.EngSubmit):
            prompt = render_chat(msg.messages) if msg.messages is not None else msg.prompt
            rng = request_rng(self.cfg.engine_version, msg.seed, prompt, msg.max_tokens, self.model)
            due = time.monotonic() + self.cfg.ttft_ms / 1000.0
            r = self.reqs[msg.rid] = _Req(
                msg.rid, rng, max(1, msg.max_tokens), due, prompt_tokens(prompt)
            )
            if msg.workload == "embedding":
                r.inputs = list(msg.inputs or [])
            self._schedule(r)
        elif isinstance(msg, p.EngAbort):
            self.reqs.pop(msg.rid, None)  # its heap entry is skipped when it comes up


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = msgspec.json.decode(argv[1].encode(), type=MockEngine)
    model_ref = argv[2] if len(argv) > 2 else ""
    try:
        model = load_model(model_ref)
    except OSError as e:
        sys.stderr.write(f"mock engine: cannot load model {model_ref}: {e.strerror}\n")
        return 3
    MockEngineProcess(argv[0], cfg, model).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
