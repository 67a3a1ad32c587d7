"""Continuous batching with a KV cache over a transformers causal LM: the torch engine's core.

The running batch is one left-padded KV cache (``[rows, heads, columns, dim]`` per layer) with
a 2-D attention mask saying which columns are real. New requests are prefilled together
(left-padded among themselves) and join the batch by padding whichever side is shorter; each
``step`` decodes one token for every row; finished rows leave and columns that are padding in
every remaining row are cut off the left. Greedy, or seeded sampling with one generator per
request, so that a request's tokens do not depend on the draws of its neighbours.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import DynamicCache, PreTrainedModel


@dataclass(slots=True)
class NewRequest:
    rid: int
    prompt_ids: list[int]
    max_tokens: int
    seed: int = 0
    temperature: float | None = None  # None or 0: greedy
    top_p: float | None = None


@dataclass(slots=True)
class _Row:
    rid: int
    max_tokens: int
    temperature: float
    top_p: float
    gen: torch.Generator | None
    produced: int = 0


# (rid, token id, finish reason or None) for each row a forward pass produced a token for.
Emitted = list[tuple[int, int, str | None]]


class BatchDecoder:
    def __init__(
        self,
        model: PreTrainedModel,
        *,
        max_batch: int,
        max_seq_len: int,
        eos_ids: frozenset[int] = frozenset(),
    ) -> None:
        self.model = model
        # The KV cache's keyword: ``cache`` where transformers has it (5.x renamed it and warns
        # on the old name, which goes in 5.40), ``past_key_values`` on the 5.x before that.
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.device = next(model.parameters()).device
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.eos_ids = eos_ids
        self.rows: list[_Row] = []
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)
        self.pos = torch.zeros(0, dtype=torch.long, device=self.device)  # next position id
        self.last = torch.zeros(0, dtype=torch.long, device=self.device)  # last token per row

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def room(self) -> int:
        return self.max_batch - len(self.rows)

    def fit(self, req: NewRequest) -> NewRequest:
        """The request cut to ``max_seq_len``: output first, then the prompt's tail. Its
        ``prompt_ids`` are the prompt tokens the engine reads (an empty prompt stays empty:
        :meth:`add` prefills it from one placeholder token that is no prompt)."""
        max_tokens = max(1, min(req.max_tokens, self.max_seq_len - 1))
        ids = req.prompt_ids[-(self.max_seq_len - max_tokens) :]
        return NewRequest(req.rid, ids, max_tokens, req.seed, req.temperature, req.top_p)

    @torch.inference_mode()
    def add(self, reqs: list[NewRequest]) -> Emitted:
        """Prefill ``reqs`` (at most ``room``) as one padded batch; their first tokens."""
        if not reqs:
            return []
        if len(reqs) > self.room:
            raise ValueError(f"{len(reqs)} requests for {self.room} free rows")
        reqs = [self.fit(r) for r in reqs]
        prompts = [r.prompt_ids or [0] for r in reqs]  # a row needs one real column
        width = max(len(ids) for ids in prompts)
        ids = torch.zeros((len(reqs), width), dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, prompt in enumerate(prompts):
            ids[i, width - len(prompt) :] = torch.tensor(prompt)
            mask[i, width - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{self.cache_kw: cache},
        )
        rows = [
            _Row(
                r.rid,
                r.max_tokens,
                float(r.temperature or 0.0),
                float(r.top_p if r.top_p is not None else 1.0),
                self._generator(r),
            )
            for r in reqs
        ]
        tokens = self._sample(out.logits[:, -1, :], rows)
        self._join(cache, mask, positions[:, -1] + 1, tokens, rows)
        return self._account(rows, tokens)

    def _generator(self, r: NewRequest) -> torch.Generator | None:
        if not r.temperature:
            return None
        gen = torch.Generator(device=self.device)
        gen.manual_seed(r.seed)
        return gen

    def _join(
        self,
        cache: DynamicCache,
        mask: torch.Tensor,
        pos: torch.Tensor,
        last: torch.Tensor,
        rows: list[_Row],
    ) -> None:
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.pos, self.last, self.rows = cache, mask, pos, last, rows
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(_layers(self.cache), _layers(cache), strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width), _pad_left(theirs.keys, width)])
            mine.values = torch.cat(
                [_pad_left(mine.values, width), _pad_left(theirs.values, width)]
            )
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.pos = torch.cat([self.pos, pos])
        self.last = torch.cat([self.last, last])
        self.rows = self.rows + rows

    @torch.inference_mode()
    def step(self) -> Emitted:
        """One decode step: the next token of every row."""
        if not self.rows:
            return []
        n = len(self.rows)
        self.mask = torch.cat([self.mask, self.mask.new_ones((n, 1))], dim=1)
        out = self.model(
            input_ids=self.last[:, None],
            attention_mask=self.mask,
            position_ids=self.pos[:, None],
            use_cache=True,
            **{self.cache_kw: self.cache},
        )
        tokens = self._sample(out.logits[:, -1, :], self.rows)
        self.pos = self.pos + 1
        self.last = tokens
        return self._account(self.rows, tokens)

    def _sample(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        tokens = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            if row.gen is None:
                continue
            probs = torch.softmax(logits[i].float() / row.temperature, dim=-1)
            if row.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                keep = sorted_p.cumsum(0) - sorted_p < row.top_p  # always keeps the top one
                probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_p[keep])
            tokens[i] = torch.multinomial(probs, 1, generator=row.gen)[0]
        return tokens

    def _account(self, rows: list[_Row], tokens: torch.Tensor) -> Emitted:
        emitted: Emitted = []
        done: list[int] = []
        for row, tok in zip(rows, tokens.tolist(), strict=True):
            row.produced += 1
            reason = None
            if tok in self.eos_ids:
                reason = "stop"
            elif row.produced >= row.max_tokens:
                reason = "length"
            emitted.append((row.rid, tok, reason))
            if reason is not None:
                done.append(row.rid)
        if done:
            self.remove(done)
        return emitted

    def remove(self, rids: list[int]) -> None:
        """Drop rows (finished or aborted), then the columns no remaining row uses."""
        gone = set(rids)
        keep = [i for i, r in enumerate(self.rows) if r.rid not in gone]
        if len(keep) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in keep]
        if not self.rows:
            self.cache = None
            self.mask = self.mask[:0, :0]
            self.pos, self.last = self.pos[:0], self.last[:0]
            return
        index = torch.tensor(keep, device=self.device)
        used = self.mask.index_select(0, index)
        start = int(used.any(dim=0).nonzero()[0])  # first column a remaining row uses
        assert self.cache is not None
        for layer in _layers(self.cache):
            layer.keys = layer.keys.index_select(0, index)[:, :, start:]
            layer.values = layer.values.index_select(0, index)[:, :, start:]
        self.mask = used[:, start:]
        self.pos = self.pos.index_select(0, index)
        self.last = self.last.index_select(0, index)

    def clear(self) -> list[int]:
        """Drop every row (after a failed step); the rids that were running."""
        rids = [r.rid for r in self.rows]
        self.remove(rids)
        return rids


@torch.inference_mode()
def embed(
    model: PreTrainedModel, prompts: list[list[int]], *, max_seq_len: int, max_batch: int
) -> tuple[list[list[float]], int]:
    """One vector per prompt: the base model's last hidden states, mean-pooled over the prompt's
    real tokens and L2-normalised; and the tokens read. Outside the decode batch (no KV cache),
    ``max_batch`` prompts per forward pass, right-padded so that padding is never attended to
    by a real token (causal attention) and a prompt's vector does not depend on its neighbours.
    A prompt longer than ``max_seq_len`` is cut to its head; an empty one is read as one
    placeholder token that does not count."""
    device = next(model.parameters()).device
    base = model.base_model  # the decoder without its LM head: no vocabulary-sized logits
    prompts = [ids[:max_seq_len] for ids in prompts]
    vectors: list[list[float]] = []
    for start in range(0, len(prompts), max(1, max_batch)):
        chunk = [ids or [0] for ids in prompts[start : start + max(1, max_batch)]]
        width = max(len(ids) for ids in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, row in enumerate(chunk):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = base(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        weights = mask.unsqueeze(-1).to(torch.float32)
        mean = (hidden.float() * weights).sum(dim=1) / weights.sum(dim=1)
        vectors += F.normalize(mean, dim=-1).tolist()
    return vectors, sum(len(ids) for ids in prompts)


def _layers(cache: DynamicCache) -> list[Any]:
    """The per-layer caches, each with ``keys`` and ``values`` (transformers 5's layout)."""
    return list(cache.layers)


def _pad_left(x: torch.Tensor, width: int) -> torch.Tensor:
    """``x`` with its sequence axis (dim 2 of a cache tensor, dim 1 of a mask) padded with
    zeros on the left to ``width``."""
    axis = 2 if x.dim() == 4 else 1
    missing = width - x.shape[axis]
    if missing <= 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - axis) + [missing, 0]
    return F.pad(x, pad)
