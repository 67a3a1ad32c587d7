"""The torch engine's batch decoder on CPU with a tiny random Llama: a request's tokens are the
same alone or in a batch that others join and leave, sampling is seeded per request, and the
limits (rows, sequence length, end of sequence) hold."""

from __future__ import annotations

import pytest
import torch

from engine_procs import torch_models
from engine_procs.torch_batch import BatchDecoder, NewRequest


@pytest.fixture(scope="module")
def tiny() -> torch_models.Loaded:
    return torch_models.load("random:tiny", torch.device("cpu"), torch.float32, weights_seed=0)


def decoder(tiny: torch_models.Loaded, **kw: object) -> BatchDecoder:
    args: dict[str, object] = {"max_batch": 8, "max_seq_len": 256, **kw}
    return BatchDecoder(tiny.model, **args)  # type: ignore[arg-type]


def alone(tiny: torch_models.Loaded, req: NewRequest) -> list[int]:
    d = decoder(tiny)
    out = [t for _, t, _ in d.add([req])]
    while len(d):
        out += [t for _, t, _ in d.step()]
    return out


def prompt(tiny: torch_models.Loaded, i: int) -> list[int]:
    return tiny.text.encode("the quick brown fox " * (i + 1))


def test_a_request_decodes_the_same_alone_and_in_a_changing_batch(
    tiny: torch_models.Loaded,
) -> None:
    reqs = [NewRequest(i, prompt(tiny, i), 6 + 4 * i) for i in range(6)]
    want = {r.rid: alone(tiny, r) for r in reqs}
    assert len({tuple(v[:5]) for v in want.values()}) > 1  # different prompts, different text
    d = decoder(tiny)
    got: dict[int, list[int]] = {r.rid: [] for r in reqs}
    waiting = list(reqs)
    turn = 0
    while waiting or len(d):
        emitted = []
        if waiting and turn % 2 == 0:  # join two at a time, every other step
            emitted += d.add([waiting.pop(0) for _ in range(min(2, len(waiting)))])
        emitted += d.step()
        for rid, tok, _ in emitted:
            got[rid].append(tok)
        turn += 1
    assert got == want
    for r in reqs:
        assert len(got[r.rid]) == r.max_tokens


def test_rows_leave_and_the_padding_they_leave_is_cut(tiny: torch_models.Loaded) -> None:
    d = decoder(tiny)
    long_prompt = NewRequest(1, prompt(tiny, 5), 50)
    short = NewRequest(2, prompt(tiny, 0), 50)
    want = alone(tiny, short)
    got = [t for rid, t, _ in d.add([long_prompt, short]) if rid == 2]
    width = d.mask.shape[1]
    d.remove([1])  # aborted: its columns go, the short row's stay
    assert [r.rid for r in d.rows] == [2]
    assert d.mask.shape[1] < width
    assert bool(d.mask.all())
    while len(d):
        got += [t for _, t, _ in d.step()]
    assert got == want


def test_seeded_sampling_is_per_request(tiny: torch_models.Loaded) -> None:
    def req(seed: int, rid: int = 1) -> NewRequest:
        return NewRequest(rid, prompt(tiny, 1), 24, seed=seed, temperature=1.0, top_p=0.95)

    first = alone(tiny, req(7))
    assert alone(tiny, req(7)) == first
    assert alone(tiny, req(8)) != first
    # Beside another sampled request, its draws are its own.
    d = decoder(tiny)
    got: list[int] = []
    for rid, tok, _ in d.add([req(99, rid=5), req(7, rid=1)]):
        if rid == 1:
            got.append(tok)
    while len(d):
        got += [t for rid, t, _ in d.step() if rid == 1]
    assert got == first
    assert alone(tiny, NewRequest(1, prompt(tiny, 1), 24)) != first  # greedy differs


def test_top_p_that_keeps_one_token_is_greedy(tiny: torch_models.Loaded) -> None:
    greedy = alone(tiny, NewRequest(1, prompt(tiny, 2), 16))
    assert alone(tiny, NewRequest(1, prompt(tiny, 2), 16, 3, 1.0, 1e-9)) == greedy


def test_limits(tiny: torch_models.Loaded) -> None:
    d = decoder(tiny, max_batch=2, max_seq_len=32)
    with pytest.raises(ValueError, match="3 requests for 2 free rows"):
        d.add([NewRequest(i, [1, 2], 4) for i in range(3)])
    # Output first, then the prompt's tail, within max_seq_len.
    fitted = d.fit(NewRequest(1, list(range(100)), 1000))
    assert fitted.max_tokens == 31 and fitted.prompt_ids == [99]
    fitted = d.fit(NewRequest(1, list(range(100)), 8))
    assert fitted.prompt_ids == list(range(76, 100))
    assert d.fit(NewRequest(1, [], 8)).prompt_ids == []  # no prompt token to count
    out = d.add([NewRequest(1, [5, 6], 1)])
    assert out[0][2] == "length" and len(d) == 0
    out = d.add([NewRequest(2, [], 1), NewRequest(3, [5, 6, 7], 1)])  # an empty prompt decodes
    assert [(rid, reason) for rid, _, reason in out] == [(2, "length"), (3, "length")]


def test_end_of_sequence_stops_a_request(tiny: torch_models.Loaded) -> None:
    first = alone(tiny, NewRequest(1, prompt(tiny, 3), 12))
    eos = first[4]
    d = BatchDecoder(tiny.model, max_batch=4, max_seq_len=256, eos_ids=frozenset([eos]))
    emitted = d.add([NewRequest(1, prompt(tiny, 3), 12)])
    while len(d):
        emitted += d.step()
    stop = first.index(eos)
    assert [t for _, t, _ in emitted] == first[: stop + 1]
    assert emitted[-1][2] == "stop"
