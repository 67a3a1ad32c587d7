"""The built-in torch engine: a process that decodes with a real model, batched, on its GPU.

Run by the torch adapter as ``python -m engine_procs.torch_engine ADDR CONFIG_JSON MODEL_REF``
with ``CUDA_VISIBLE_DEVICES`` already set to the replica's devices. It speaks the mock
engine's protocol over a ZeroMQ PAIR socket (``EngSubmit``/``EngAbort`` in, ``EngReady`` and
one ``EngTextStep`` per engine step out), detokenizing itself so that the supervisor only
forwards text. Each loop turn takes every message waiting, prefills the new requests that fit
(``max_batch``), decodes one token for every running request, and sends what came out. A
request's prompt length, in the model tokenizer's tokens the engine actually reads (the
prompt's tail, when ``max_seq_len`` cuts it), goes out in the step that prefills it.

A chat (``EngSubmit.messages``) is rendered with the model's chat template
(:meth:`Text.encode_chat <engine_procs.torch_models.Text.encode_chat>`) and then decodes like
any prompt. An embedding request (``workload = "embedding"``) does not join the decode batch:
the next turn embeds its inputs (:func:`engine_procs.torch_batch.embed`, one forward pass per
``max_batch`` inputs) and answers with one ``EngEmbedding`` carrying the tokens read.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import msgspec
import zmq

from engine_procs import engine_link, torch_models
from engine_procs.torch_batch import BatchDecoder, NewRequest, embed
from engine_procs.torch_models import Detokenizer, Loaded
from ipc import protocol as p
from orchd.config import TorchEngine


class TorchEngineProcess:
    def __init__(self, addr: str, cfg: TorchEngine, loaded: Loaded, engine_version: str) -> None:
        self.cfg = cfg
        self.loaded = loaded
        self.engine_version = engine_version
        self.decoder = BatchDecoder(
            loaded.model,
            max_batch=cfg.max_batch,
            max_seq_len=cfg.max_seq_len,
            eos_ids=loaded.eos_ids,
        )
        self.waiting: dict[int, NewRequest] = {}  # submitted, not yet in the batch (FIFO)
        self.text: dict[int, Detokenizer] = {}
        self.to_embed: dict[int, list[list[int]]] = {}  # embedding requests' inputs, as ids
        self.embedded: list[p.EngEmbedding] = []  # answers made by step(), not yet sent
        self.refused: list[tuple[int, str]] = []  # (rid, why): failed in the next step
        self.ctx, self.sock = engine_link.connect(addr)

    def run(self) -> None:
        vocab_size = self.loaded.text.vocab_size
        self.sock.send(p.encode(p.EngReady(self.engine_version, vocab_size, os.getpid())))
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        while True:
            busy = bool(self.waiting or self.to_embed or self.refused) or len(self.decoder) > 0
            if poller.poll(0 if busy else None):
                for msg in engine_link.waiting(self.sock):
                    self.handle(msg)
            step = self.step()
            if step.tokens or step.finished or step.errors or step.prompts:
                step.t_ns = time.monotonic_ns()
                self.sock.send(p.encode(step))  # blocks when the supervisor is not reading
            for answer in self.embedded:
                self.sock.send(p.encode(answer))
            self.embedded.clear()

    def handle(self, msg: msgspec.Struct) -> None:
        if isinstance(msg, p.EngSubmit):
            text = self.loaded.text
            if msg.workload == "embedding":
                self.to_embed[msg.rid] = [text.encode(t) for t in msg.inputs or []]
                return
            if msg.messages is None:
                ids = text.encode(msg.prompt)
            else:
                try:
                    ids = text.encode_chat(msg.messages)
                except Exception as e:  # e.g. a template that wants alternating roles
                    why = f"{engine_link.INVALID_PREFIX}the model's chat template refused it: {e}"
                    self.refused.append((msg.rid, why[:500]))
                    return
            self.waiting[msg.rid] = NewRequest(
                msg.rid, ids, msg.max_tokens, msg.seed, msg.temperature, msg.top_p
            )
        elif isinstance(msg, p.EngAbort):
            self.refused = [(rid, why) for rid, why in self.refused if rid != msg.rid]
            if self.to_embed.pop(msg.rid, None) is not None:
                return
            if self.waiting.pop(msg.rid, None) is None:
                self.decoder.remove([msg.rid])
            self.text.pop(msg.rid, None)

    def embed_waiting(self, out: p.EngTextStep) -> None:
        """Answer every embedding request waiting (into ``embedded``; a failure into
        ``out.errors``, failing that request only)."""
        cfg = self.cfg
        while self.to_embed:
            rid = next(iter(self.to_embed))
            prompts = self.to_embed.pop(rid)
            try:
                vectors, n = embed(
                    self.loaded.model, prompts, max_seq_len=cfg.max_seq_len, max_batch=cfg.max_batch
                )
            except Exception as e:  # e.g. CUDA out of memory: fail this request, keep serving
                traceback.print_exc(file=sys.stderr)
                out.errors.append((rid, f"torch engine embedding failed: {type(e).__name__}: {e}"))
                continue
            self.embedded.append(p.EngEmbedding(rid, vectors, n))

    def step(self) -> p.EngTextStep:
        out = p.EngTextStep([], errors=self.refused)
        self.refused = []
        self.embed_waiting(out)
        admit: list[NewRequest] = []
        while self.waiting and len(admit) < self.decoder.room:
            rid = next(iter(self.waiting))
            r = self.decoder.fit(self.waiting.pop(rid))  # the prompt as the engine reads it
            admit.append(r)
            out.prompts.append((r.rid, len(r.prompt_ids)))
        try:
            if admit:
                for r in admit:
                    self.text[r.rid] = self.loaded.text.stream()
                self._emit(out, self.decoder.add(admit))
            self._emit(out, self.decoder.step())
        except Exception as e:  # e.g. CUDA out of memory: fail this batch, keep serving
            traceback.print_exc(file=sys.stderr)
            message = f"torch engine step failed: {type(e).__name__}: {e}"[:500]
            for rid in self.decoder.clear() + [r.rid for r in admit]:
                if self.text.pop(rid, None) is not None:
                    out.errors.append((rid, message))
        return out

    def _emit(self, out: p.EngTextStep, emitted: list[tuple[int, int, str | None]]) -> None:
        pieces: dict[int, list[str]] = {}
        for rid, token, reason in emitted:
            text = self.text.get(rid)
            if text is None:
                continue
            piece = text.push(token)
            if reason is not None:
                piece += text.flush()
                out.finished.append((rid, reason))
                del self.text[rid]
            pieces.setdefault(rid, []).append(piece)
        out.tokens.extend(pieces.items())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = msgspec.json.decode(argv[1].encode(), type=TorchEngine)
    model_ref = argv[2] if len(argv) > 2 else "random:tiny"
    device = torch_models.pick_device(cfg.device)
    try:
        dtype = torch_models.pick_dtype(cfg.dtype, device)
        loaded = torch_models.load(model_ref, device, dtype, cfg.weights_seed)
    except (OSError, ValueError) as e:
        sys.stderr.write(f"torch engine: cannot load model {model_ref}: {e}\n")
        return 3
    version = cfg.engine_version or f"torch-{torch_models.torch.__version__}"
    TorchEngineProcess(argv[0], cfg, loaded, version).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
