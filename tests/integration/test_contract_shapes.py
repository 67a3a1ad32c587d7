"""The shapes issue 14 names, against orchd in its default configuration (no config file, so
no budgets and no sentinel values): what a client generated from the contract reads."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import stream, submit
from tests.support.daemon import Daemon
from tests.support.sse import sync_request
from tests.support.wait import wait_for

D1 = "sha256:" + "1" * 64


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("default"), "") as d:
        yield d


def call(d: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, raw = sync_request(d.host, d.port, method, path, d.headers, body)
    return status, json.loads(raw) if raw else None


def no_nulls(value: Any) -> bool:
    if isinstance(value, dict):
        return all(v is not None and no_nulls(v) for v in value.values())
    if isinstance(value, list):
        return all(no_nulls(v) for v in value)
    return True


def test_unlimited_budgets_are_omitted_and_times_are_integers(plain: Daemon) -> None:
    # ~1.4 s of tokens at the mock's 2 ms each: past the default 1 s `metrics` interval.
    status, body, headers = submit(plain, max_tokens=700, session_id="s-shapes")
    assert status == 202
    assert not [h for h in headers if h.startswith("x-budget-")]
    with closing(stream(plain, body["task_id"])) as s:
        assert not [h for h in s.headers if h.startswith("x-budget-")]
        events = s.read_to_end()
    metrics = [e.json for e in events if e.event == "metrics"]
    assert metrics and all(
        set(m) == {"queue_depth", "on_time_probability", "kv_warmth"} for m in metrics
    )
    end = events[-1].json
    assert isinstance(end["decode_ms"], int) and isinstance(end["decode_time_ms"], int)
    status, sess = call(plain, "GET", "/v1/sessions/s-shapes")
    assert status == 200 and no_nulls(sess) and "tokens_budget_remaining" not in sess

    # The transcript holds every event as {type, id, data}, the terminal `end` included.
    got: list[tuple[int, Any]] = []
    wait_for(
        lambda: (
            got.append(call(plain, "GET", f"/v1/artifacts/{end['artifact_id']}"))
            or got[-1][0] == 200
        ),
        10,
        "the transcript",
    )
    art = got[-1][1]
    assert art["kind"] == "trace" and art["digest"] == art["id"] == end["artifact_id"]
    ev = art["content"]["events"]
    assert [e["type"] for e in ev] == [e.event for e in events]
    assert [e["id"] for e in ev] == [int(e.id or -1) for e in events]
    assert ev[-1]["data"] == {k: v for k, v in end.items() if k != "artifact_id"}


def test_errors_have_no_nulls_name_the_engine_and_list_every_field(plain: Daemon) -> None:
    bad = {"engine": "mock", "ctx": 0, "priority": "urgent", "task_id": "t x"}
    status, _, raw = sync_request(plain.host, plain.port, "POST", "/v1/tasks", plain.headers, bad)
    env = json.loads(raw)
    assert status == 400 and env["code"] == "INVALID_PARAMS" and env["engine"] == "mock"
    assert no_nulls(env)
    fields = {e["field"] for e in env["errors"]}
    assert {"ctx", "priority", "task_id", "session_id", "model_ref", "max_tokens"} <= fields
    # Refused after parsing (an unknown model): the engine the request named is still there.
    status, env, _ = submit(plain, model_ref="mock:nowhere")
    assert status >= 400 and env["engine"] == "mock" and no_nulls(env)
    status, env = call(plain, "GET", "/v1/tasks/ghost/stream")
    assert status == 404 and no_nulls(env) and "engine" not in env


def test_artifacts_bodies_and_listing(plain: Daemon) -> None:
    status, root = call(
        plain, "POST", "/v1/artifacts", {"kind": "plan", "content": {"s": 1}, "tags": ["x", "y"]}
    )
    assert status == 201 and set(root) == {"id", "kind", "digest", "created_ms", "tags"}
    assert root["tags"] == ["x", "y"] and root["created_ms"] > 1e12
    child = {
        "kind": "diff",
        "content": "+a",
        "parent": root["id"],
        "metadata": {"by": "bot"},
        "tags": ["y"],
    }
    status, kid = call(plain, "POST", "/v1/artifacts", child)
    assert status == 201 and kid["parent"] == root["id"]
    status, got = call(plain, "GET", f"/v1/artifacts/{kid['id']}")
    assert status == 200 and got["metadata"] == {"by": "bot"} and got["content"] == "+a"
    assert {k: got[k] for k in kid} == kid  # GET returns every field of the 201
    ids = lambda q: [a["id"] for a in call(plain, "GET", f"/v1/artifacts{q}")[1]["artifacts"]]  # noqa: E731
    assert ids(f"?parent={root['id']}") == [kid["id"]]
    assert ids("?tag=x") == [root["id"]]
    assert set(ids("?tag=y")) == {root["id"], kid["id"]}
    assert ids("?kind=diff&tag=y") == [kid["id"]]
    assert call(plain, "GET", "/v1/artifacts?kind=note")[0] == 400
    missing = "sha256:" + "0" * 64
    status, env = call(
        plain, "POST", "/v1/artifacts", {"kind": "other", "content": 1, "parent": missing}
    )
    assert status == 400 and "parent" in env["message"]
    status, env = call(
        plain, "POST", "/v1/artifacts", {"kind": "notes", "content": 1, "tags": [""]}
    )
    assert status == 400 and {e["field"] for e in env["errors"]} == {"kind", "tags[0]"}


def test_catalog_minimal_model_listing_and_retire_deadline(plain: Daemon) -> None:
    status, m = call(plain, "POST", "/v1/catalog/models", {"id": "bare", "digest": D1})
    assert status == 201 and no_nulls(m) and m["warnings"] == ["no signature", "no SBOM"]
    status, listed = call(plain, "GET", "/v1/catalog/models")
    assert status == 200 and "bare" in [x["id"] for x in listed["models"]]

    # The default pool's model, retired with a deadline: the running task goes on until then.
    assert call(plain, "POST", "/v1/catalog/models", {"id": "tiny", "ref": "mock:tiny"})[0] == 201
    status, body, _ = submit(plain, max_tokens=5000)  # ~10 s of tokens
    with closing(stream(plain, body["task_id"])) as s:
        s.read_until(lambda x: len(x.events) >= 3)
        retire = {"state": "Retired", "deadline_ms": 300}
        status, m = call(plain, "POST", "/v1/catalog/models/tiny/state", retire)
        assert status == 202 and m["retire_deadline_ms"] > 1e12
        assert submit(plain)[0] == 403  # new tasks: MODEL_DEPRECATED at once
        events = s.read_to_end(15)
    assert call(plain, "DELETE", "/v1/catalog/models/tiny")[0] == 204
    assert events[-1].event == "error" and events[-1].json["code"] == "MODEL_DEPRECATED"
    assert len([e for e in events if e.event == "token"]) > 2


def test_pools_listed_undrained_and_task_state(plain: Daemon) -> None:
    status, body = call(plain, "GET", "/v1/pools")
    assert status == 200 and [x["pool_id"] for x in body["pools"]] == ["default"]
    status, task, _ = submit(plain, max_tokens=3000)  # ~6 s of tokens
    tid = task["task_id"]
    wait_for(lambda: call(plain, "GET", f"/v1/tasks/{tid}")[1]["state"] == "running", 10, "running")
    # Tokens so far arrive with the supervisor's heartbeat (server.heartbeat_ms, 2 s).
    wait_for(lambda: call(plain, "GET", f"/v1/tasks/{tid}")[1]["tokens_out"] > 0, 10, "progress")
    _, st = call(plain, "GET", f"/v1/tasks/{tid}")
    assert st["pool_id"] == "default" and st["running_ms"] >= 0
    assert call(plain, "POST", "/v1/pools/default/drain", {"deadline_ms": 60_000})[0] == 202
    _, h = call(plain, "GET", "/v1/pools/default/health")
    assert h["draining"] and not h["drained"]
    assert call(plain, "POST", f"/v1/tasks/{tid}/cancel")[0] == 204
    wait_for(lambda: call(plain, "GET", "/v1/pools/default/health")[1]["drained"], 10, "drained")
    _, st = call(plain, "GET", f"/v1/tasks/{tid}")
    assert st["state"] == "ended" and st["reason"] == "canceled" and st["tokens_out"] > 0
    status, h = call(plain, "POST", "/v1/pools/default/undrain")
    assert status == 200 and not h["draining"] and not h["drained"] and h["ready"]
    status, _, _ = submit(plain, max_tokens=2)
    assert status == 202  # in service again, without a reload
    assert call(plain, "GET", "/v1/tasks/never")[0] == 404


def test_relative_model_path_is_found_under_the_model_roots(plain: Daemon) -> None:
    roots = Path(plain.run_dir) / "models"
    roots.mkdir(exist_ok=True)
    (roots / "rel.bin").write_bytes(b"weights")
    status, m = call(plain, "POST", "/v1/catalog/models", {"id": "rel", "ref": "rel.bin"})
    assert status == 201 and m["source_url"] == f"file:{(roots / 'rel.bin').resolve()}"
    assert call(plain, "POST", "/v1/catalog/models", {"id": "r2", "ref": "../up.bin"})[0] == 400
