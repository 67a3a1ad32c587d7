"""Control-plane operations (orchd/core/control.py) on a scheduler core built from the config
as the scheduler process builds it (orchd/scheduler/build.py), driven with explicit time."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ipc import protocol as p
from orchd import config as cfgmod
from orchd.core.catalog import sign
from orchd.core.control import API_VERSION, RELOAD_TIMEOUT_MS, Control
from orchd.core.scheduler import SchedulerCore, State
from orchd.scheduler.build import build_core
from tests.support.contract import _resolve

FE = "fe0"
ADMIN = "fe0"
M = "mock:tiny"
NEW = "mock:new"
D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
CONTRACTS = Path(__file__).resolve().parents[2] / "contracts" / "openapi"


@functools.cache
def contract(doc: str = "control.yaml") -> dict[str, Any]:
    return yaml.safe_load((CONTRACTS / doc).read_text())


def schema(name: str, doc: str = "control.yaml") -> dict[str, Any]:
    resolved: dict[str, Any] = _resolve(contract(doc)["components"]["schemas"][name], doc)
    return resolved


def response_schema(path: str, method: str, status: int) -> dict[str, Any]:
    resp = contract()["paths"][path][method]["responses"][str(status)]
    resolved: dict[str, Any] = _resolve(
        resp["content"]["application/json"]["schema"], "control.yaml"
    )
    return resolved


def conforms(body: Any, name: str, doc: str = "control.yaml") -> None:
    jsonschema.Draft202012Validator(schema(name, doc)).validate(body)


# ---------------------------------------------------------------- a cluster in a test


def make(
    *, trust_policy: str = "permissive", signing_keys: dict[str, str] | None = None, **kw: Any
) -> tuple[SchedulerCore, Control]:
    """Pools a (r0, r1) and b (r2) serve mock:tiny; c (r3) serves mock:other. One slot each."""
    cfg = cfgmod.Config(
        pools=[
            cfgmod.Pool(id="a", model_ref=M),
            cfgmod.Pool(id="b", model_ref=M),
            cfgmod.Pool(id="c", model_ref="mock:other", supported_workloads=["completion"]),
        ],
        replicas=[
            cfgmod.Replica(id="r0", pool_id="a", slots=1, devices="0"),
            cfgmod.Replica(id="r1", pool_id="a", slots=1, devices="1"),
            cfgmod.Replica(id="r2", pool_id="b", slots=1, devices="2"),
            cfgmod.Replica(id="r3", pool_id="c", slots=1, devices="3"),
        ],
        limits=cfgmod.Limits(queue_capacity=16, ctx_limit=4096, max_tokens_limit=512),
        catalog=cfgmod.Catalog(trust_policy=trust_policy, signing_keys=signing_keys or {}),
        **kw,
    )
    core, control = build_core(cfg)
    for rid in core.replicas:
        assert core.replica_status(f"sup-{rid}", p.ReplicaStatus(rid, True, "mock", "m-1"), 1) == []
    return core, control


_req = iter(range(1, 10**9))


def q(control: Control, op: str, now: float = 10, key: str = "k1", **args: Any) -> list:
    return control.handle(ADMIN, p.Query(next(_req), op, args, key), now)


def reply(out: list) -> p.Reply:
    replies = [m for _, m in out if isinstance(m, p.Reply)]
    assert len(replies) == 1, out
    return replies[0]


def failed(out: list) -> p.ErrorInfo:
    fails = [m for _, m in out if isinstance(m, p.Failed)]
    assert len(fails) == 1, out
    return fails[0].error


def of(out: list, kind: type) -> list:
    return [(peer, m) for peer, m in out if isinstance(m, kind)]


def spec(tid: str, key: str = "k1", session: str | None = None, **kw: Any) -> p.TaskSpec:
    base: dict[str, Any] = {
        "task_id": tid,
        "session_id": session or f"s-{tid}",
        "workload": "completion",
        "model_ref": M,
        "engine": "mock",
        "ctx": 128,
        "priority": "interactive",
        "max_tokens": 16,
        "deadline_ms": 60_000,
        "api_key_id": key,
    }
    base.update(kw)
    return p.TaskSpec(**base)


def submit(core: SchedulerCore, tid: str, now: float = 10, **kw: Any) -> list:
    return core.submit(FE, p.Submit(next(_req), spec(tid, **kw)), now)


def dispatched(out: list) -> list[tuple[str, str]]:
    return [(peer, m.task.task_id) for peer, m in out if isinstance(m, p.Dispatch)]


def fill(core: SchedulerCore, now: float = 10) -> dict[str, str]:
    """t0..t2 take r0, r1 (pool a) and r2 (pool b); task -> replica."""
    where = {}
    for i in range(3):
        ((peer, tid),) = dispatched(submit(core, f"t{i}", now))
        where[tid] = peer.removeprefix("sup-")
    assert sorted(where.values()) == ["r0", "r1", "r2"]
    return where


def end(core: SchedulerCore, tid: str, now: float, tokens_out: int = 1) -> list:
    t = core.tasks[tid]
    return core.task_ended(f"sup-{t.replica}", p.TaskEnded(tid, "stop", tokens_out), now)


def on(core: SchedulerCore, where: dict[str, str], pool: str) -> list[str]:
    return sorted(t for t, r in where.items() if core.replicas[r].pool_id == pool)


# ---------------------------------------------------------------- dispatching queries


def test_unknown_op_is_invalid_params() -> None:
    _, control = make()
    out = control.handle(ADMIN, p.Query(77, "pool.explode", {}), 0)
    assert out == [(ADMIN, out[0][1])]
    f = out[0][1]
    assert isinstance(f, p.Failed) and f.req_id == 77
    assert f.error.code == "INVALID_PARAMS" and "pool.explode" in f.error.message


# ---------------------------------------------------------------- health and drain


def test_pool_health() -> None:
    core, control = make()
    fill(core)
    submit(core, "q1")  # queued; prefers pool a
    out = control.handle(ADMIN, p.Query(5, "pool.health", {"pool_id": "a"}), 20)
    assert len(out) == 1
    peer, r = out[0]
    assert peer == ADMIN and isinstance(r, p.Reply) and (r.req_id, r.status) == (5, 200)
    h = r.body
    assert (h["live"], h["ready"], h["draining"], h["last_error"]) == (True, True, False, None)
    m = h["metrics"]
    assert (m["replicas"], m["ready_replicas"], m["active_tasks"], m["slots"]) == (2, 2, 2, 2)
    assert (m["queued_tasks"], m["model_ref"], m["engine_version"], m["version"]) == (
        1,
        M,
        "m-1",
        1,
    )
    conforms(h, "PoolHealth")
    assert reply(q(control, "pool.health", pool_id="b")).body["metrics"]["queued_tasks"] == 0


def test_pool_health_unknown_pool() -> None:
    _, control = make()
    e = failed(q(control, "pool.health", pool_id="zz"))
    assert e.code == "NOT_FOUND"


def test_pool_drain_reply() -> None:
    core, control = make()
    fill(core)
    r = reply(q(control, "pool.drain", 100, pool_id="a", deadline_ms=5000))
    assert r.status == 202
    assert r.body == {"pool_id": "a", "draining": True, "deadline_ms": 5000, "running": 2}
    jsonschema.validate(r.body, response_schema("/v1/pools/{pool_id}/drain", "post", 202))
    pool = core.pools.pools["a"]
    assert (pool.draining, pool.drain_deadline_ms) == (True, 5100)
    h = reply(q(control, "pool.health", pool_id="a")).body
    assert (h["ready"], h["draining"]) == (False, True)
    assert failed(q(control, "pool.drain", pool_id="zz", deadline_ms=1)).code == "NOT_FOUND"


def test_drain_deadline_aborts_running_tasks_of_that_pool() -> None:
    core, control = make()
    where = fill(core)
    q(control, "pool.drain", 100, pool_id="a", deadline_ms=1000)
    assert of(core.tick(1099), p.Abort) == []
    out = core.tick(1100)
    aborts = of(out, p.Abort)
    assert sorted(m.task_id for _, m in aborts) == on(core, where, "a")
    assert all(m.reason == "drained" for _, m in aborts)
    assert all(peer == f"sup-{where[m.task_id]}" for peer, m in aborts)
    # Pool b's task runs on; aborts are not repeated.
    assert core.tasks[on(core, where, "b")[0]].state is State.RUNNING
    assert of(core.tick(1200), p.Abort) == []
    assert core.stats.canceled == {"drained": 2}


def test_drain_moves_queued_work_to_another_pool_serving_the_model() -> None:
    core, control = make()
    where = fill(core)
    submit(core, "q1", 20)
    submit(core, "q2", 21)
    q(control, "pool.drain", 30, pool_id="a", deadline_ms=60_000)
    # A slot frees in the draining pool: nothing is placed there.
    ta = on(core, where, "a")[0]
    assert dispatched(end(core, ta, 40)) == []
    assert core.tasks["q1"].state is State.QUEUED
    # A slot frees in pool b: the queued work goes there, in order.
    tb = on(core, where, "b")[0]
    out = end(core, tb, 50)
    assert dispatched(out) == [("sup-r2", "q1")]
    assert "fallback to pool b" in core.tasks["q1"].placement_reason
    assert dispatched(end(core, "q1", 60)) == [("sup-r2", "q2")]


def test_new_tasks_for_a_draining_pool_only() -> None:
    core, control = make()
    q(control, "pool.drain", 30, pool_id="a", deadline_ms=1000)
    q(control, "pool.drain", 30, pool_id="b", deadline_ms=1000)
    ((_, f),) = submit(core, "x", 40)
    assert isinstance(f, p.Failed) and f.error.code == "POOL_UNAVAILABLE"
    # Pinned to the draining pool without fallback: refused too.
    ((_, f),) = submit(
        core, "y", 41, placement={"mode": "pin", "pin_pool_id": "a", "allow_fallback": False}
    )
    assert isinstance(f, p.Failed) and f.error.code == "POOL_UNAVAILABLE"
    assert f.error.pool_id == "a"


def test_queued_task_pinned_to_a_drained_pool_waits_and_runs_after_reload() -> None:
    core, control = make()
    fill(core)
    pin = {"mode": "pin", "pin_pool_id": "a", "allow_fallback": False}
    submit(core, "q1", 20, placement=pin)
    q(control, "pool.drain", 30, pool_id="a", deadline_ms=100)
    core.tick(500)  # past the deadline: running tasks aborted, the queued one kept
    assert core.tasks["q1"].state is State.QUEUED
    for t in ("t0", "t1", "t2"):
        if core.tasks[t].state is State.RUNNING:
            end(core, t, 510)
    assert core.tasks["q1"].state is State.QUEUED  # pool a still draining
    # Reloading the same model brings the pool back: q1 runs there.
    out = q(control, "pool.reload", 600, pool_id="a", new_model_ref=M)
    rid = of(out, p.ReloadPrepare)[0][1].req_id
    control.reload_ready("sup-r0", p.ReloadReady(rid, True, "m-1"), 610)
    out = control.reload_ready("sup-r1", p.ReloadReady(rid, True, "m-1"), 611)
    assert reply(out).status == 200
    assert [t for _, t in dispatched(out)] == ["q1"]
    assert not core.pools.pools["a"].draining


# ---------------------------------------------------------------- reload


def start_reload(control: Control, pool: str = "a", ref: str = NEW, now: float = 100) -> int:
    out = q(control, "pool.reload", now, pool_id=pool, new_model_ref=ref)
    assert of(out, p.Reply) == [] and of(out, p.Failed) == []
    preps = of(out, p.ReloadPrepare)
    assert preps, out
    (rid,) = {m.req_id for _, m in preps}
    return rid


def test_reload_unknown_pool() -> None:
    _, control = make()
    e = failed(q(control, "pool.reload", pool_id="zz", new_model_ref=NEW))
    assert e.code == "NOT_FOUND"


@pytest.mark.parametrize("why", ["retired", "mismatch", "malformed", "strict-unsigned"])
def test_reload_refused_model(why: str) -> None:
    core, control = make(
        trust_policy="strict" if why == "strict-unsigned" else "permissive",
        signing_keys={"k": "secret"},
    )
    ref = NEW
    if why != "malformed":
        reply(q(control, "catalog.create", id="new", ref=NEW, digest=D1))
    if why == "retired":
        q(control, "catalog.state", model_id="new", state="Retired")
    elif why == "mismatch":
        core.catalog.record_verification("new", D2, 50)
    elif why == "malformed":
        ref = "http://host/model"
    out = q(control, "pool.reload", pool_id="a", new_model_ref=ref)
    e = failed(out)
    assert e.code == "RELOAD_FAILED" and e.pool_id == "a"
    assert of(out, p.ReloadPrepare) == []
    pool = core.pools.pools["a"]
    assert (pool.model_ref, pool.version, pool.reloading) == (M, 1, False)


def test_reload_strict_signed_model_goes_ahead() -> None:
    _, control = make(trust_policy="strict", signing_keys={"k": "secret"})
    body = {
        "id": "new",
        "ref": NEW,
        "digest": D1,
        "signature": sign(D1, "secret"),
        "signing_key": "k",
    }
    reply(q(control, "catalog.create", **body))
    start_reload(control)


def test_reload_prepares_every_connected_replica_of_the_pool() -> None:
    core, control = make()
    core.peer_down("sup-r1", "gone", 50)
    out = q(control, "pool.reload", 100, pool_id="a", new_model_ref=NEW)
    assert [(peer, type(m)) for peer, m in out] == [("sup-r0", p.ReloadPrepare)]
    assert out[0][1].model_ref == NEW
    assert core.pools.pools["a"].reloading
    # A second reload while one is pending is refused.
    assert failed(q(control, "pool.reload", 101, pool_id="a", new_model_ref=NEW)).code == (
        "RELOAD_FAILED"
    )


def test_reload_with_no_live_replica() -> None:
    core, control = make()
    core.peer_down("sup-r2", "gone", 50)
    e = failed(q(control, "pool.reload", 100, pool_id="b", new_model_ref=NEW))
    assert e.code == "RELOAD_FAILED" and "no live replica" in e.message
    assert not core.pools.pools["b"].reloading


def test_reload_all_ready_commits() -> None:
    core, control = make()
    q(control, "pool.drain", 50, pool_id="a", deadline_ms=10_000)
    out = q(control, "pool.reload", 100, pool_id="a", new_model_ref=NEW)
    assert sorted(peer for peer, _ in of(out, p.ReloadPrepare)) == ["sup-r0", "sup-r1"]
    rid = out[0][1].req_id
    assert control.reload_ready("sup-r1", p.ReloadReady(rid, True, "m-2"), 110) == []
    out = control.reload_ready("sup-r0", p.ReloadReady(rid, True, "m-2"), 120)
    commits = of(out, p.ReloadCommit)
    assert sorted(peer for peer, _ in commits) == ["sup-r0", "sup-r1"]
    assert all(m.req_id == rid for _, m in commits)
    r = reply(out)
    assert (r.status, r.body) == (200, {"pool_id": "a", "model_ref": NEW, "version": 2})
    jsonschema.validate(r.body, response_schema("/v1/pools/{pool_id}/reload", "post", 200))
    assert [peer for peer, m in out if m is r] == [ADMIN]
    pool = core.pools.pools["a"]
    assert (pool.model_ref, pool.version, pool.engine_version) == (NEW, 2, "m-2")
    assert (pool.draining, pool.drain_deadline_ms, pool.reloading) == (False, None, False)
    # New tasks for the new model go there; the old model is still served by b.
    assert dispatched(submit(core, "n1", 130, model_ref=NEW))[0][0] in ("sup-r0", "sup-r1")
    assert dispatched(submit(core, "o1", 131)) == [("sup-r2", "o1")]


def test_reload_one_failure_aborts_the_prepared_ones() -> None:
    core, control = make()
    rid = start_reload(control)
    assert control.reload_ready("sup-r0", p.ReloadReady(rid, True, "m-2"), 110) == []
    out = control.reload_ready("sup-r1", p.ReloadReady(rid, False, error="out of memory"), 120)
    assert of(out, p.ReloadCommit) == []
    assert [(peer, m) for peer, m in of(out, p.ReloadAbort)] == [("sup-r0", p.ReloadAbort(rid))]
    e = failed(out)
    assert e.code == "RELOAD_FAILED" and e.pool_id == "a"
    assert "out of memory" in e.message and M in e.message
    pool = core.pools.pools["a"]
    assert (pool.model_ref, pool.version, pool.reloading, pool.engine_version) == (
        M,
        1,
        False,
        "m-1",
    )
    assert "out of memory" in pool.last_error
    assert reply(q(control, "pool.health", pool_id="a")).body["last_error"] == pool.last_error
    # The old model is still served there.
    assert dispatched(submit(core, "o1", 130))[0][0] in ("sup-r0", "sup-r1")
    # And the pool may be reloaded again.
    start_reload(control, now=140)


def test_reload_supervisor_dying_fails_the_reload() -> None:
    core, control = make()
    rid = start_reload(control)
    assert control.reload_ready("sup-r0", p.ReloadReady(rid, True, "m-2"), 110) == []
    out = control.peer_down("sup-r1")
    assert of(out, p.ReloadAbort) == [("sup-r0", p.ReloadAbort(rid))]
    e = failed(out)
    assert e.code == "RELOAD_FAILED" and "died" in e.message
    assert core.pools.pools["a"].model_ref == M
    # A late answer of the dead supervisor is ignored; so is a peer with nothing pending.
    assert control.reload_ready("sup-r1", p.ReloadReady(rid, True, "m-2"), 120) == []
    assert control.peer_down("sup-r2") == []


def test_reload_timeout() -> None:
    core, control = make()
    rid = start_reload(control, now=100)
    control.reload_ready("sup-r0", p.ReloadReady(rid, True, "m-2"), 110)
    assert control.tick(100 + RELOAD_TIMEOUT_MS) == []
    out = control.tick(100 + RELOAD_TIMEOUT_MS + 1)
    assert of(out, p.ReloadAbort) == [("sup-r0", p.ReloadAbort(rid))]
    e = failed(out)
    assert e.code == "RELOAD_FAILED" and "no answer" in e.message and "r1" in e.message
    assert (core.pools.pools["a"].model_ref, core.pools.pools["a"].reloading) == (M, False)
    assert control.tick(100 + 2 * RELOAD_TIMEOUT_MS) == []


def test_reload_ready_from_strangers_is_ignored() -> None:
    _, control = make()
    rid = start_reload(control)
    assert control.reload_ready("sup-r2", p.ReloadReady(rid, True, "x"), 110) == []
    assert control.reload_ready("sup-r0", p.ReloadReady(rid + 1000, True, "x"), 110) == []
    control.reload_ready("sup-r0", p.ReloadReady(rid, True, "m-2"), 111)
    assert control.reload_ready("sup-r0", p.ReloadReady(rid, False, error="again"), 112) == []
    assert reply(control.reload_ready("sup-r1", p.ReloadReady(rid, True, "m-2"), 113)).status == 200


def test_reload_does_not_commit_mixed_engine_versions() -> None:
    """A pool pins one engine_version and refuses a replica running another. If the replicas
    prepare the new model on different engine versions, the reload commits anyway and pins
    the first version it sees; the other replica is then refused as soon as it reports, so a
    '200, atomic switch' leaves half the pool unready. Either refuse the reload (409, old model
    kept) or keep every replica that committed usable."""
    core, control = make()
    rid = start_reload(control)
    control.reload_ready("sup-r0", p.ReloadReady(rid, True, "m-2"), 110)
    out = control.reload_ready("sup-r1", p.ReloadReady(rid, True, "m-3"), 111)
    if of(out, p.Failed):
        assert failed(out).code == "RELOAD_FAILED"
        assert core.pools.pools["a"].model_ref == M
        return
    assert reply(out).status == 200
    # After the commit each supervisor reports the engine it now runs.
    core.replica_status("sup-r0", p.ReplicaStatus("r0", True, "mock", "m-2"), 120)
    core.replica_status("sup-r1", p.ReplicaStatus("r1", True, "mock", "m-3"), 121)
    refused = [r for r in ("r0", "r1") if not core.replicas[r].ready]
    assert refused == [], (
        f"committed reload left {refused} refused: {core.replicas['r1'].last_error}"
    )


def test_reload_fails_queued_tasks_nobody_serves_any_more() -> None:
    core, control = make()
    assert dispatched(submit(core, "c0", 10, model_ref="mock:other")) == [("sup-r3", "c0")]
    submit(core, "c1", 11, model_ref="mock:other")  # queued: pool c is full
    submit(core, "c2", 12, model_ref="mock:other")
    core.subscribe(FE, p.Subscribe(998, "c1", 0, 4), 13)
    rid = start_reload(control, "c", NEW, 30)
    out = control.reload_ready("sup-r3", p.ReloadReady(rid, True, "m-2"), 31)
    assert reply(out).status == 200
    sf = [m for _, m in of(out, p.StreamFail)]
    assert [(m.task_id, m.slot, m.error.code) for m in sf] == [("c1", 4, "POOL_UNAVAILABLE")]
    for tid in ("c1", "c2"):
        t = core.tasks[tid]
        assert t.state is State.ENDED and t.error is not None
        assert t.error.code == "POOL_UNAVAILABLE"
    assert len(core.queue) == 0
    # The running task finishes on the old engine.
    assert core.tasks["c0"].state is State.RUNNING


def test_reload_leaves_no_pinned_queued_task_hanging() -> None:
    """A queued task pinned to pool a (no fallback) when a is reloaded to another model can
    never run: its only pool serves something else now. Control._maybe_finish only fails
    queued tasks when *no pool at all* serves their model; pool b still serves mock:tiny, so
    the task stays QUEUED for ever (DESIGN: no accepted task is lost or left hanging)."""
    core, control = make()
    fill(core)
    pin = {"mode": "pin", "pin_pool_id": "a", "allow_fallback": False}
    out = submit(core, "q1", 20, placement=pin)
    assert of(out, p.Admitted) and core.tasks["q1"].pools == ["a"]
    core.subscribe(FE, p.Subscribe(999, "q1", 0, 5), 21)
    rid = start_reload(control, "a", NEW, 30)
    control.reload_ready("sup-r0", p.ReloadReady(rid, True, "m-2"), 31)
    out = control.reload_ready("sup-r1", p.ReloadReady(rid, True, "m-2"), 32)
    assert reply(out).status == 200
    for t in ("t0", "t1", "t2"):
        out += end(core, t, 40)
    assert core.tasks["q1"].state is State.ENDED, (
        "pinned task left queued for a model its pool no longer serves"
    )
    sf = [m for _, m in of(out, p.StreamFail) if m.task_id == "q1"]
    assert sf and sf[0].error.code == "POOL_UNAVAILABLE"


# ---------------------------------------------------------------- sessions


def test_session_get_and_delete_by_owner_only() -> None:
    core, control = make(
        sessions=cfgmod.Sessions(session_budget=cfgmod.Budget(tokens=1000, time_ms=60_000))
    )
    submit(core, "t1", 10, key="k1", session="s1")
    end(core, "t1", 110, tokens_out=12)
    r = reply(q(control, "session.get", 120, key="k1", session_id="s1"))
    assert r.status == 200
    v = r.body
    assert v["session_id"] == "s1" and v["turns"] == 1 and v["max_turns"] == 8
    assert v["tokens_budget_remaining"] == 988
    assert v["time_budget_remaining_ms"] == 60_000 - 100
    assert v["kv_warmth"] is True  # its last replica is ready
    assert v["kv_bytes"] == 12 * 1024
    assert v["ttl_ms_remaining"] == 600_000 - 10
    conforms(v, "Session", "data.yaml")
    # Another key sees nothing (not even that it exists).
    e = failed(q(control, "session.get", 120, key="k2", session_id="s1"))
    assert e.code == "NOT_FOUND"
    assert failed(q(control, "session.delete", 120, key="k2", session_id="s1")).code == "NOT_FOUND"
    assert failed(q(control, "session.get", 120, key="k1", session_id="nope")).code == "NOT_FOUND"
    # Its replica gone, the session is cold.
    core.peer_down(f"sup-{core.tasks['t1'].replica}", "gone", 125)
    assert (
        reply(q(control, "session.get", 126, key="k1", session_id="s1")).body["kv_warmth"] is False
    )
    r = reply(q(control, "session.delete", 130, key="k1", session_id="s1"))
    assert (r.status, r.body) == (204, None)
    assert failed(q(control, "session.get", 131, key="k1", session_id="s1")).code == "NOT_FOUND"


def test_session_expired_is_not_found() -> None:
    core, control = make()
    submit(core, "t1", 10, session="s1")
    end(core, "t1", 20)
    assert reply(q(control, "session.get", 20 + 600_000 - 1, session_id="s1")).status == 200
    assert failed(q(control, "session.get", 20 + 600_000, session_id="s1")).code == "NOT_FOUND"


# ---------------------------------------------------------------- catalog


def test_catalog_ops_statuses() -> None:
    core, control = make()
    control.wall_offset_ms = 1_000_000.0
    r = reply(q(control, "catalog.create", 5, id="m1", ref="hf:org/name@v1", digest=D1))
    assert r.status == 201
    assert (r.body["id"], r.body["state"], r.body["created_ms"]) == ("m1", "Active", 1_000_005.0)
    conforms(r.body, "Model")
    r = reply(q(control, "catalog.get", model_id="m1"))
    assert (r.status, r.body["ref"]) == (200, "hf:org/name@v1")
    conforms(r.body, "Model")
    r = reply(q(control, "catalog.verify", model_id="m1"))
    assert (r.status, r.body) == (
        202,
        {"id": "m1", "ref": "hf:org/name@v1", "verification": "started"},
    )
    jsonschema.validate(
        r.body, response_schema("/v1/catalog/models/{model_id}/verify", "post", 202)
    )
    r = reply(q(control, "catalog.state", model_id="m1", state="Retired"))
    assert (r.status, r.body["state"]) == (202, "Retired")
    conforms(r.body, "Model")
    assert core.catalog.get("m1").state == "Retired"
    r = reply(q(control, "catalog.delete", model_id="m1"))
    assert (r.status, r.body) == (204, None)
    assert core.catalog.models == {}


def test_catalog_ops_errors() -> None:
    _, control = make()
    assert failed(q(control, "catalog.get", model_id="nope")).code == "NOT_FOUND"
    assert failed(q(control, "catalog.delete", model_id="nope")).code == "NOT_FOUND"
    assert failed(q(control, "catalog.verify", model_id="nope")).code == "NOT_FOUND"
    assert failed(q(control, "catalog.state", model_id="nope", state="Active")).code == "NOT_FOUND"
    e = failed(q(control, "catalog.create", id="m1", ref="file:relative/path"))
    assert e.code == "INVALID_PARAMS" and "absolute" in e.message
    reply(q(control, "catalog.create", id="m1", ref="mock:a"))
    assert failed(q(control, "catalog.create", id="m1", ref="mock:b")).code == "INVALID_PARAMS"
    assert failed(q(control, "catalog.state", model_id="m1", state="Gone")).code == "INVALID_PARAMS"
    assert failed(q(control, "catalog.create", id="m2", ref="mock:b", digest="abc")).code == (
        "INVALID_PARAMS"
    )


def test_catalog_state_takes_effect_at_admission() -> None:
    core, control = make()
    reply(q(control, "catalog.create", id="tiny", ref=M))
    assert of(submit(core, "t1", 10), p.Admitted)
    assert of(submit(core, "t2", 10, model_ref="tiny"), p.Admitted)  # by id too
    q(control, "catalog.state", model_id="tiny", state="Retired")
    ((_, f),) = submit(core, "t3", 11)
    assert isinstance(f, p.Failed) and f.error.code == "MODEL_DEPRECATED"
    q(control, "catalog.state", model_id="tiny", state="Active")
    core.catalog.record_verification("tiny", D2, 12)  # pins D2
    core.catalog.record_verification("tiny", D1, 13)  # the file changed: mismatch
    ((_, f),) = submit(core, "t4", 14)
    assert isinstance(f, p.Failed) and f.error.code == "UNTRUSTED_ARTIFACT"
    assert "t3" not in core.tasks and "t4" not in core.tasks


# ---------------------------------------------------------------- capabilities


def test_capabilities_lists_each_pool() -> None:
    core, control = make()
    r = reply(q(control, "capabilities"))
    assert r.status == 200
    body = r.body
    conforms(body, "Capabilities")
    info = contract()["info"]
    assert body["api_version"] == API_VERSION == str(info["version"])
    engines = {e["pool_id"]: e for e in body["engines"]}
    assert set(engines) == {"a", "b", "c"}
    a = engines["a"]
    assert (a["engine"], a["engine_version"], a["model_ref"]) == ("mock", "m-1", M)
    assert (a["ctx_max"], a["max_tokens_out"], a["concurrency"]) == (4096, 512, 2)
    assert a["supported_workloads"] == ["completion", "embedding"]  # the mock can embed
    assert a["rate_limits"] == {"queue_capacity": 16}
    assert a["features"]["queue_policy"] == "reject"
    assert engines["c"]["model_ref"] == "mock:other"
    assert engines["b"]["concurrency"] == 1
