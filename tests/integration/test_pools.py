"""Placement over pools, pool health, drain and atomic reload: each behaviour and each error
produced by its real cause."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.conftest import run_task, stream, submit
from tests.support.daemon import Daemon
from tests.support.sse import sync_request

POOLS = """
[server]
restart_backoff_ms = 100
restart_backoff_max_ms = 400

[catalog]
model_roots = ["{models}"]  # reloads to file: refs resolve only under it

[[pools]]
id = "pool-a"
model_ref = "mock:tiny"
[[pools]]
id = "pool-b"
model_ref = "mock:tiny"
[[pools]]
id = "pool-c"
model_ref = "mock:other"
[[pools]]
id = "pool-d"
model_ref = "file:/nonexistent/orchd-test-model.bin"

[[replicas]]
id = "a0"
pool_id = "pool-a"
[[replicas]]
id = "a1"
pool_id = "pool-a"
[[replicas]]
id = "b0"
pool_id = "pool-b"
devices = "0"
[replicas.mock]
itl_ms = 5
[[replicas]]
id = "c0"
pool_id = "pool-c"
model_ref = "mock:other"
[[replicas]]
id = "d0"
pool_id = "pool-d"
model_ref = "file:/nonexistent/orchd-test-model.bin"
"""


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("pools")
    (workdir / "models").mkdir()
    with Daemon(workdir, POOLS.replace("{models}", str(workdir / "models"))) as d:
        yield d


def post(d: Daemon, path: str, body: Any = None) -> tuple[int, dict[str, Any]]:
    status, _, raw = sync_request(d.host, d.port, "POST", path, d.headers, body)
    return status, json.loads(raw) if raw else {}


def get(d: Daemon, path: str) -> tuple[int, dict[str, Any]]:
    status, _, raw = sync_request(d.host, d.port, "GET", path, d.headers)
    return status, json.loads(raw) if raw else {}


def started(d: Daemon, **over: Any) -> dict[str, Any]:
    s = run_task(d, **over)
    assert s.events[-1].event == "end", s.events[-1]
    return s.events[0].json


def test_placement_overrides(pools: Daemon) -> None:
    assert started(pools, placement={"mode": "pin", "pin_pool_id": "pool-b"})["pool_id"] == "pool-b"
    assert started(pools, placement={"prefer_pools": ["pool-b"]})["pool_id"] == "pool-b"
    assert started(pools, placement={"avoid_pools": ["pool-a"]})["pool_id"] == "pool-b"
    assert started(pools, placement={"require_device_mask": "0,1"})["replica_id"] == "b0"
    first = started(pools)
    assert first["pool_id"] == "pool-a" and first["placement"]
    assert started(pools, model_ref="mock:other")["pool_id"] == "pool-c"


def test_placement_errors_have_their_real_causes(pools: Daemon) -> None:
    status, body, _ = submit(pools, placement={"mode": "pin", "pin_pool_id": "pool-zz"})
    assert status == 400 and body["code"] == "INVALID_PARAMS" and "pin_pool_id" in body["message"]
    status, body, _ = submit(pools, placement={"require_device_mask": "5"})
    assert status == 503 and body["code"] == "REPLICA_EXHAUSTED"
    # pool-d's engine cannot load its model: the pool exists but nothing in it is ready.
    status, body, headers = submit(
        pools,
        model_ref="file:/nonexistent/orchd-test-model.bin",
        placement={"mode": "pin", "pin_pool_id": "pool-d", "allow_fallback": False},
    )
    assert status == 503 and body["code"] == "POOL_UNREADY" and body["pool_id"] == "pool-d"
    assert headers["retry-after"] and headers["x-backoff-ms"]
    status, body, _ = submit(pools, model_ref="mock:nothing-serves-this")
    assert status == 400 and "model_ref" in body["message"]
    status, body, _ = submit(pools, workload="rerank")  # no engine here reranks
    assert status == 400 and "workload" in body["message"]
    status, body, _ = submit(pools, sampler_profile_version="v9")
    assert status == 400 and "sampler_profile_version" in body["message"]
    assert started(pools, sampler_profile_version="v1")["sampler_profile_version"] == "v1"


def test_health(pools: Daemon) -> None:
    status, h = get(pools, "/v1/pools/pool-a/health")
    assert status == 200
    assert h["live"] and h["ready"] and not h["draining"]
    assert h["metrics"]["replicas"] == 2 and h["metrics"]["ready_replicas"] == 2
    assert h["metrics"]["engine_version"] == "mock-1.0"
    status, h = get(pools, "/v1/pools/pool-d/health")
    assert status == 200 and not h["ready"]
    assert "cannot load model" in (h["last_error"] or "")
    status, body = get(pools, "/v1/pools/nope/health")
    assert status == 404 and body["code"] == "NOT_FOUND"


def test_drain_ends_running_tasks_at_the_deadline_and_reload_brings_it_back(pools: Daemon) -> None:
    pin = {"mode": "pin", "pin_pool_id": "pool-b", "allow_fallback": False}
    status, body, _ = submit(pools, max_tokens=100_000 // 10, placement=pin)
    assert status == 202
    s = stream(pools, body["task_id"])
    s.read_until(lambda st: len(st.events) >= 3)
    status, res = post(pools, "/v1/pools/pool-b/drain", {"deadline_ms": 300})
    assert status == 202 and res["draining"] and res["running"] == 1
    # Nothing new is placed on a draining pool...
    status, refused, _ = submit(pools, placement=pin)
    assert status == 503 and refused["code"] == "POOL_UNAVAILABLE"
    # ...unless it may fall back to another pool serving the model.
    assert started(pools, placement={"mode": "pin", "pin_pool_id": "pool-b"})["pool_id"] == "pool-a"
    events = s.read_to_end(timeout=10)
    assert events[-1].event == "error" and events[-1].json["code"] == "POOL_UNAVAILABLE"
    assert events[-1].json["retriable"] is True
    assert get(pools, "/v1/pools/pool-b/health")[1]["draining"] is True
    status, res = post(pools, "/v1/pools/pool-b/reload", {"new_model_ref": "mock:tiny"})
    assert status == 200 and res["version"] == 2
    assert get(pools, "/v1/pools/pool-b/health")[1]["draining"] is False
    assert started(pools, placement=pin)["pool_id"] == "pool-b"


def test_failed_reload_is_409_and_the_old_model_keeps_serving(pools: Daemon) -> None:
    not_a_model = pools.workdir / "models" / "a-directory"
    not_a_model.mkdir(exist_ok=True)  # under the model roots, but no engine can load it
    status, body = post(pools, "/v1/pools/pool-c/reload", {"new_model_ref": f"file:{not_a_model}"})
    assert status == 409 and body["code"] == "RELOAD_FAILED"
    assert "engine failed to start" in body["message"]
    assert started(pools, model_ref="mock:other")["pool_id"] == "pool-c"
    status, body = post(pools, "/v1/pools/pool-c/reload", {"new_model_ref": "ftp://x/y"})
    assert status == 409 and "unknown scheme" in body["message"]
    status, body = post(pools, "/v1/pools/nope/reload", {"new_model_ref": "mock:tiny"})
    assert status == 404


def test_reload_switches_model_atomically(pools: Daemon) -> None:
    weights = pools.workdir / "models" / "model-v2.bin"
    weights.write_bytes(b"weights of model v2" * 100)
    ref = f"file:{weights}"
    before = run_task(pools, model_ref="mock:other", seed=3, max_tokens=16)
    status, res = post(pools, "/v1/pools/pool-c/reload", {"new_model_ref": ref})
    assert status == 200 and res["model_ref"] == ref
    after = run_task(pools, model_ref=ref, seed=3, max_tokens=16)
    assert after.events[0].json["pool_id"] == "pool-c"
    tokens = [[e.json["t"] for e in s.events if e.event == "token"] for s in (before, after)]
    assert tokens[0] != tokens[1], "the new model must really be serving"
    status, body, _ = submit(pools, model_ref="mock:other")
    assert status == 400  # nothing serves the old model any more
    assert get(pools, "/v1/pools/pool-c/health")[1]["metrics"]["model_ref"] == ref
