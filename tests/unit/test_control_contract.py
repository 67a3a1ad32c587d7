"""The control plane's newer operations, event by event on the pure core: a task's state for
its owner, pools listed and undrained, the catalog listed, and a model retired with a
deadline ending the tasks still running on it then (tests/unit/test_control.py's cluster)."""

from __future__ import annotations

from ipc import protocol as p
from orchd.core.errors import Code
from tests.unit.test_control import (
    D1,
    M,
    conforms,
    dispatched,
    end,
    failed,
    fill,
    make,
    q,
    reply,
    submit,
)


def test_task_state_queued_running_ended_for_its_owner_only() -> None:
    core, control = make()
    fill(core)  # r0, r1, r2 busy
    submit(core, "t3")
    submit(core, "t4")
    r = reply(q(control, "task.get", task_id="t4", now=20))
    assert r.body == {"task_id": "t4", "state": "queued", "queue_position": 2}
    assert reply(q(control, "task.get", task_id="t3")).body["queue_position"] == 1
    control.progress({"t0": 5, "t3": 9, "gone": 1})  # a supervisor's heartbeat
    r = reply(q(control, "task.get", task_id="t0", now=50))
    assert r.body["state"] == "running" and r.body["pool_id"] in ("a", "b")
    assert r.body["tokens_out"] == 5
    assert "tokens_out" not in reply(q(control, "task.get", task_id="t3")).body  # queued
    assert r.body["replica_id"] in ("r0", "r1", "r2") and r.body["running_ms"] == 40
    end(core, "t0", 60, tokens_out=3)
    r = reply(q(control, "task.get", task_id="t0", now=61))
    assert r.body == {"task_id": "t0", "state": "ended", "reason": "stop", "tokens_out": 3}
    # Another key's task is not found, nor is one that never was.
    assert failed(q(control, "task.get", task_id="t0", key="k2")).code == Code.NOT_FOUND.value
    assert failed(q(control, "task.get", task_id="nope")).code == Code.NOT_FOUND.value
    conforms(r.body, "TaskStatus", "data.yaml")


def test_queued_position_moves_up() -> None:
    core, control = make()
    fill(core)
    submit(core, "t3")
    submit(core, "t4")
    assert reply(q(control, "task.get", task_id="t4")).body["queue_position"] == 2
    out = end(core, "t0", 30)
    assert dispatched(out)  # t3 took the freed slot
    assert reply(q(control, "task.get", task_id="t4")).body["queue_position"] == 1


def test_pools_listed_drained_and_undrained_without_a_reload() -> None:
    core, control = make()
    body = reply(q(control, "pool.list")).body
    assert [x["pool_id"] for x in body["pools"]] == ["a", "b", "c"]
    assert all(not x["draining"] and not x["drained"] for x in body["pools"])
    fill(core)  # t0/t1 on pool a
    q(control, "pool.drain", pool_id="a", deadline_ms=1000)
    h = reply(q(control, "pool.health", pool_id="a")).body
    assert h["draining"] and not h["drained"]  # tasks still run there
    for tid in ("t0", "t1", "t2"):
        end(core, tid, 40)
    h = reply(q(control, "pool.health", pool_id="a", now=41)).body
    assert h["draining"] and h["drained"] and not h["ready"]
    conforms(h, "PoolHealth")
    version = h["metrics"]["version"]
    h = reply(q(control, "pool.undrain", pool_id="a", now=50)).body
    assert not h["draining"] and not h["drained"] and h["ready"]
    assert h["metrics"]["version"] == version  # no reload
    ((peer, _),) = dispatched(
        submit(core, "t9", now=51, placement={"mode": "pin", "pin_pool_id": "a"})
    )
    assert peer in ("sup-r0", "sup-r1")
    assert failed(q(control, "pool.undrain", pool_id="zz")).code == Code.NOT_FOUND.value


def test_catalog_listed_by_id() -> None:
    _, control = make()
    reply(q(control, "catalog.create", id="zeta", digest=D1))
    reply(q(control, "catalog.create", id="alpha", ref="hf:org/repo/m.gguf"))
    body = reply(q(control, "catalog.list")).body
    assert [m["id"] for m in body["models"]] == ["alpha", "zeta"]
    for m in body["models"]:
        conforms(m, "Model")
        assert None not in m.values()


def test_retired_with_a_deadline_lets_running_tasks_finish_until_then() -> None:
    core, control = make()
    control.wall_offset_ms = 0.0
    reply(q(control, "catalog.create", id="tiny", ref=M, digest=D1))
    fill(core, now=10)
    r = reply(q(control, "catalog.state", model_id="tiny", state="Retired", deadline_ms=500))
    assert r.body["state"] == "Retired" and r.body["retire_deadline_ms"] == 510
    # New work is refused at once; the running tasks go on.
    out = submit(core, "late", now=20)
    assert [m.error.code for _, m in out if isinstance(m, p.Failed)] == ["MODEL_DEPRECATED"]
    assert not control.tick(400)
    aborts = [m for _, m in control.tick(510) if isinstance(m, p.Abort)]
    assert len(aborts) == 3  # t0..t2, at the deadline
    assert not control.tick(600)  # once


def test_retire_deadline_needs_retired_and_a_bound() -> None:
    _, control = make()
    reply(q(control, "catalog.create", id="m", digest=D1))
    e = failed(q(control, "catalog.state", model_id="m", state="Active", deadline_ms=5))
    assert e.code == Code.INVALID_PARAMS.value and "deadline_ms" in e.message
    e = failed(q(control, "catalog.state", model_id="m", state="Retired", deadline_ms=-1))
    assert e.code == Code.INVALID_PARAMS.value
