"""The built-in torch engine through the whole daemon, on CPU with tiny models: streaming real
decoder output, batch-invariant greedy and seeded decoding under concurrency, cancel, a reload onto a model directory with a tokenizer, and a model that cannot load
shown in pool health."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from engine_procs import torch_models
from engine_procs.torch_batch import BatchDecoder, NewRequest
from tests.integration.conftest import cancel, metric, run_task, stream, submit
from tests.support.daemon import Daemon
from tests.support.hf import save_tiny_model
from tests.support.sse import sync_request
from tests.support.wait import wait_for

CONFIG = """
[server]
restart_backoff_ms = 100
restart_backoff_max_ms = 400

[[replicas]]
id = "t0"
pool_id = "torch"
engine = "torch"
model_ref = "random:tiny"
slots = 16
[replicas.torch]
device = "cpu"
max_batch = 8
max_seq_len = 512
engine_version = "torch-test"

[[replicas]]
id = "bad"
pool_id = "torch-bad"
engine = "torch"
model_ref = "random:nope"
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model root of the daemon below: file: refs resolve only under it."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="module")
def torchd(tmp_path_factory: pytest.TempPathFactory, models: Path) -> Iterator[Daemon]:
    roots = f'\n[catalog]\nmodel_roots = ["{models}"]\n'
    with Daemon(tmp_path_factory.mktemp("torch"), CONFIG + roots) as d:
        yield d


def task(**over: Any) -> dict[str, Any]:
    return {"engine": "torch", "model_ref": "random:tiny", "max_tokens": 24, **over}


def text_of(d: Daemon, **over: Any) -> tuple[str, list[Any]]:
    s = run_task(d, **task(**over))
    events = s.events
    assert events[-1].event == "end", events[-1]
    return "".join(e.json["t"] for e in events if e.event == "token"), events


def get(d: Daemon, path: str) -> dict[str, Any]:
    status, _, raw = sync_request(d.host, d.port, "GET", path, d.headers)
    assert status == 200, raw
    body: dict[str, Any] = json.loads(raw)
    return body


def tokens_in(d: Daemon) -> float:
    """``tokens_in_total`` once every task has ended at the scheduler."""
    wait_for(lambda: metric(d, "replica_active_slots") == 0, 10, "tasks to settle")
    return metric(d, "tokens_in_total")


def test_streams_the_models_tokens(torchd: Daemon) -> None:
    before = tokens_in(torchd)
    text, events = text_of(torchd, prompt="the quick brown fox", max_tokens=24)
    started = events[0].json
    assert started["engine"] == "torch" and started["engine_version"] == "torch-test"
    assert started["pool_id"] == "torch" and started["replica_id"] == "t0"
    assert [e.json["i"] for e in events if e.event == "token"] == list(range(24))
    assert events[-1].json["tokens_out"] == 24 and events[-1].json["reason"] == "length"
    assert text.strip()
    # random:tiny reads a token per byte of the prompt: 19.
    assert tokens_in(torchd) - before == len(b"the quick brown fox") == 19


def test_greedy_and_seeded_decoding_hold_under_concurrency(torchd: Daemon) -> None:
    prompts = [f"prompt number {i} " * (i + 1) for i in range(8)]
    kinds = [{}, {"temperature": 0.9, "top_p": 0.9, "seed": 11}]
    alone = {(p, k): text_of(torchd, prompt=p, **kinds[k])[0] for p in prompts[:4] for k in (0, 1)}
    assert len(set(alone.values())) == len(alone)  # prompts and sampling all change the text
    jobs = [(p, k) for p in prompts for k in (0, 1)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(
            pool.map(lambda job: text_of(torchd, prompt=job[0], **kinds[job[1]])[0], jobs)
        )
    for job, text in zip(jobs, together, strict=True):
        if job in alone:
            assert text == alone[job], job
    assert (
        text_of(torchd, prompt=prompts[0], temperature=0.9, top_p=0.9, seed=12)[0]
        != alone[(prompts[0], 1)]
    )


def test_cancel_ends_the_stream_and_the_engine_serves_on(torchd: Daemon) -> None:
    # (A deadline far off: on a loaded machine the ETA of 400 CPU tokens can pass 60 s.)
    status, body, _ = submit(torchd, **task(max_tokens=400, prompt="long", deadline_ms=600_000))
    assert status == 202, body
    s = stream(torchd, body["task_id"])
    s.read_until(lambda st: sum(e.event == "token" for e in st.events) >= 3)
    assert cancel(torchd, body["task_id"]) == 204
    events = s.read_to_end()
    assert events[-1].event == "end" and events[-1].json["reason"] == "canceled"
    s.close()
    with ThreadPoolExecutor(8) as pool:
        ends = list(pool.map(lambda i: text_of(torchd, prompt=f"x{i}", max_tokens=8)[1], range(8)))
    assert [e[-1].json["tokens_out"] for e in ends] == [8] * 8


def test_reload_onto_a_model_directory_with_its_tokenizer(torchd: Daemon, models: Path) -> None:
    model = save_tiny_model(models / "tiny-bpe")
    ref = f"file:{model}"
    status, _, raw = sync_request(
        torchd.host,
        torchd.port,
        "POST",
        "/v1/pools/torch/reload",
        torchd.headers,
        {"new_model_ref": ref},
    )
    assert status == 200, raw
    text, events = text_of(torchd, model_ref=ref, prompt="hello world", max_tokens=40)
    assert events[0].json["pool_id"] == "torch"
    # The same model decoded here, greedily: the stream is its tokenizer's text of those ids.
    loaded = torch_models.load(ref, torch.device("cpu"), torch.float32, 0)
    decoder = BatchDecoder(loaded.model, max_batch=1, max_seq_len=512, eos_ids=loaded.eos_ids)
    out = decoder.add([NewRequest(1, loaded.text.encode("hello world"), 40)])
    while len(decoder):
        out += decoder.step()
    assert events[-1].json["tokens_out"] == len(out)
    assert events[-1].json["reason"] == out[-1][2]
    tokenizer = loaded.text.tokenizer
    assert tokenizer is not None
    assert text == tokenizer.decode([t for _, t, _ in out], skip_special_tokens=True)
    assert get(torchd, "/v1/pools/torch/health")["metrics"]["model_ref"] == ref


def test_a_model_that_cannot_load_is_reported(torchd: Daemon) -> None:
    health = get(torchd, "/v1/pools/torch-bad/health")
    assert not health["ready"]
    assert "no random config 'nope'" in (health["last_error"] or "")
