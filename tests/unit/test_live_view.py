"""The operator's view of the scheduler (orchd/core/recent.py, orchd/core/live.py and the
``ready``, ``admin.live`` and ``pool.undrain`` ops), driven event by event with explicit time."""

from __future__ import annotations

from typing import Any

import pytest

from ipc import protocol as p
from orchd.core import live as livemod
from orchd.core.control import Control
from orchd.core.live import readiness
from orchd.core.placement import ReplicaView
from orchd.core.pools import PoolState
from orchd.core.recent import (
    GPU_HISTORY,
    GPU_SAMPLE_MS,
    RECENT_TASKS,
    TTFT_WINDOW_MS,
    GpuHistory,
    ReplicaWindow,
    percentile,
)
from orchd.core.scheduler import SchedulerCore

_req = iter(range(1, 10**9))


def make(*, ready: bool = True, capacity: int = 64) -> tuple[SchedulerCore, Control]:
    """Pool a: r0, r1 (one slot each); pool b: b0 (one slot); all serve mock:tiny."""
    reps = [
        ReplicaView("r0", "a", "mock", 1),
        ReplicaView("r1", "a", "mock", 1),
        ReplicaView("b0", "b", "mock", 1),
    ]
    pools = [
        PoolState("a", "mock", "mock:tiny", "", "v1", ["completion"], 0),
        PoolState("b", "mock", "mock:tiny", "", "v1", ["completion"], 0),
    ]
    core = SchedulerCore(reps, pools, queue_capacity=capacity)
    if ready:
        for r in reps:
            core.replica_status("launcher", p.ReplicaStatus(r.id, True, "mock", "m-1"), 0)
    return core, Control(core, 4096, 4096, capacity)


def spec(tid: str, priority: str = "interactive") -> p.TaskSpec:
    return p.TaskSpec(
        task_id=f"k1/{tid}",
        session_id=f"k1/s-{tid}",
        workload="completion",
        model_ref="mock:tiny",
        engine="mock",
        ctx=128,
        priority=priority,
        max_tokens=16,
        deadline_ms=100_000,
        api_key_id="k1",
    )


def submit(core: SchedulerCore, tid: str, now: float, priority: str = "interactive") -> list:
    return core.submit("fe0", p.Submit(next(_req), spec(tid, priority)), now)


def query(control: Control, op: str, now: float, **args: Any) -> p.Reply:
    out = control.handle("fe0", p.Query(next(_req), op, args, "k1"), now)
    reply = out[0][1]
    assert isinstance(reply, p.Reply), out
    return reply


# ---------------------------------------------------------------- rates and percentiles


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0


def test_tokens_are_spread_over_the_time_they_were_made() -> None:
    w = ReplicaWindow()
    w.add(10_000, 12_000, 200, 5.0)  # 100 tokens in second 10, 100 in second 11
    assert w.tokens_per_s(12_000) == pytest.approx(200 / 9.0)  # buckets 3..12 cover 9 s
    # Second 10 has left the window; second 11 has not.
    assert w.tokens_per_s(20_500) == pytest.approx(100 / 9.5)
    assert w.tokens_per_s(22_000) == 0.0
    assert not w.buckets  # pruned


def test_a_task_with_no_generation_time_counts_at_its_end() -> None:
    w = ReplicaWindow()
    w.add(5_000, 5_000, 10, None)
    # now 5.5 s: buckets -4..5 cover 9.5 s
    assert w.tokens_per_s(5_500) == pytest.approx(10 / 9.5)


def test_ttft_percentiles_cover_the_last_minute_only() -> None:
    w = ReplicaWindow()
    assert w.ttft_ms(0) == (None, None)
    for i in range(1, 101):
        w.add(i, i, 1, float(i))
    assert w.ttft_ms(1_000) == (50.0, 99.0)
    w.add(40_000, 40_000, 1, 1_000.0)
    assert w.ttft_ms(40_000 + TTFT_WINDOW_MS - 1) == (1_000.0, 1_000.0)  # the rest expired
    assert w.ttft_ms(40_001 + TTFT_WINDOW_MS) == (None, None)


def test_gpu_history_keeps_one_reading_a_second_and_three_minutes_of_them() -> None:
    h = GpuHistory()
    row = {"index": 0, "name": "g", "utilization": 0.5, "vram_used": 1, "power_w": 2.0}
    h.observe(0, [row])
    h.observe(GPU_SAMPLE_MS / 2, [{**row, "utilization": 0.9}])  # too soon for the history
    assert h.view(False) == [{**row, "utilization": 0.9}]  # ... but the latest reading
    assert h.view(True)[0]["history"]["utilization"] == [0.5]
    assert h.view(True)[0]["history"]["temperature_c"] == [None]  # the device cannot tell
    for i in range(1, GPU_HISTORY + 10):
        h.observe(i * GPU_SAMPLE_MS, [{**row, "utilization": i / 1000}])
    series = h.view(True)[0]["history"]["utilization"]
    assert len(series) == GPU_HISTORY
    assert series[-1] == (GPU_HISTORY + 9) / 1000


# ---------------------------------------------------------------- fed by the scheduler core


def test_a_task_that_ran_leaves_its_outcome_rate_and_ttft() -> None:
    core, _ = make()
    submit(core, "t1", 100)
    t = core.tasks["k1/t1"]
    assert t.replica
    core.task_ended(
        f"sup-{t.replica}",
        p.TaskEnded("k1/t1", "length", 41, first_token_ms=20.0, decode_ms=420.0),
        520,
    )
    (o,) = core.recent.view(1_000_000)
    assert o["task_id"] == "k1/t1" and o["api_key_id"] == "k1"
    assert (o["outcome"], o["error_code"], o["tokens_out"]) == ("length", "", 41)
    assert (o["pool_id"], o["replica_id"]) == ("a", t.replica)
    assert (o["queue_ms"], o["ttft_ms"], o["total_ms"]) == (0.0, 20.0, 420.0)
    assert o["tokens_per_s"] == pytest.approx(41 * 1000 / 400, rel=1e-3)
    assert o["ended_at_ms"] == 1_000_520
    window = core.recent.replicas[t.replica]
    assert window.ttft_ms(600) == (20.0, 20.0)
    assert window.tokens_per_s(600) > 0


def test_a_task_canceled_in_the_queue_has_no_replica_and_its_wait() -> None:
    core, _ = make(ready=False)
    submit(core, "q1", 0, "batch")
    core.cancel("fe0", p.Cancel(next(_req), "k1/q1", "client"), 250)
    (o,) = core.recent.view(0)
    assert (o["outcome"], o["replica_id"], o["pool_id"]) == ("canceled", "", "a")
    assert (o["queue_ms"], o["ttft_ms"], o["tokens_per_s"]) == (250.0, None, None)


def test_failed_tasks_carry_their_code_and_the_ring_is_bounded() -> None:
    core, _ = make()
    for i in range(RECENT_TASKS + 5):
        submit(core, f"t{i}", i)
        t = core.tasks[f"k1/t{i}"]
        core.task_ended(
            f"sup-{t.replica}", p.TaskEnded(f"k1/t{i}", "error", 0, error_code="DECODE_TIMEOUT"), i
        )
    view = core.recent.view(0)
    assert len(view) == RECENT_TASKS
    assert view[0]["task_id"] == f"k1/t{RECENT_TASKS + 4}"  # newest first
    assert {(o["outcome"], o["error_code"]) for o in view} == {("error", "DECODE_TIMEOUT")}


# ---------------------------------------------------------------- readiness


def test_ready_while_one_replica_of_an_undrained_pool_is_ready() -> None:
    core, control = make()
    reply = query(control, "ready", 0)
    assert reply.status == 200
    assert reply.body == {"ready": True, "replicas": 3, "ready_replicas": 3, "not_ready": []}
    query(control, "pool.drain", 0, pool_id="a", deadline_ms=0)
    reply = query(control, "ready", 0)
    assert reply.status == 200 and reply.body["ready_replicas"] == 1
    assert {(r["replica_id"], r["state"]) for r in reply.body["not_ready"]} == {
        ("r0", "draining"),
        ("r1", "draining"),
    }
    query(control, "pool.drain", 0, pool_id="b", deadline_ms=0)
    reply = query(control, "ready", 0)
    assert reply.status == 503
    assert reply.body["reason"] == "no replica can serve a task"
    assert reply.body["not_ready"][2] == {
        "replica_id": "b0",
        "pool_id": "b",
        "state": "draining",
        "reason": "pool b is draining",
    }


def test_each_replica_says_why_it_cannot_serve() -> None:
    core, _ = make(ready=False)
    core.replicas["r1"].connected = True
    core.replica_status("launcher", p.ReplicaStatus("b0", False, "mock", "", "model missing"), 0)
    core.peer_down("sup-b0", "exited with 1", 0)
    ok, body = readiness(core)
    assert not ok
    assert [(r["replica_id"], r["state"], r["reason"]) for r in body["not_ready"]] == [
        ("r0", "starting", "its supervisor has not connected yet"),
        ("r1", "starting", "its engine is starting"),
        ("b0", "down", "its supervisor is down: exited with 1"),
    ]
    core.replica_status("launcher", p.ReplicaStatus("b0", False, "mock", "", "model missing"), 0)
    assert readiness(core)[1]["not_ready"][2]["reason"] == "its engine is not ready: model missing"


def test_not_ready_once_shutting_down() -> None:
    core, _ = make()
    core.drain_all("launcher", p.DrainAll(next(_req), 1_000), 0)
    ok, body = readiness(core)
    assert not ok and body["ready_replicas"] == 3
    assert body["reason"] == "orchd is shutting down: it admits no new task"


# ---------------------------------------------------------------- undrain


def test_undrain_serves_the_queue_again() -> None:
    core, control = make()
    query(control, "pool.drain", 0, pool_id="b", deadline_ms=10_000)
    submit(core, "a1", 1)
    submit(core, "a2", 1)  # pool a's two slots are taken, pool b is draining: t1 waits
    assert not [m for _, m in submit(core, "t1", 1) if isinstance(m, p.Dispatch)]
    out = control.handle("fe0", p.Query(next(_req), "pool.undrain", {"pool_id": "b"}, "k1"), 2)
    reply = out[0][1]
    assert isinstance(reply, p.Reply) and reply.status == 200
    assert not reply.body["draining"] and reply.body["ready"]
    assert [(peer, m.task.task_id) for peer, m in out if isinstance(m, p.Dispatch)] == [
        ("sup-b0", "k1/t1")
    ]
    assert not core.pools.pools["b"].draining and core.pools.pools["b"].drain_deadline_ms is None
    err = control.handle("fe0", p.Query(next(_req), "pool.undrain", {"pool_id": "x"}, ""), 3)
    assert isinstance(err[0][1], p.Failed) and err[0][1].error.code == "NOT_FOUND"


# ---------------------------------------------------------------- the snapshot


def test_snapshot_shows_pools_queues_streams_and_tasks() -> None:
    core, control = make()
    submit(core, "run1", 0)
    submit(core, "run2", 0)
    submit(core, "run3", 0)  # three slots: all run
    submit(core, "q-i", 10, "interactive")
    submit(core, "q-b1", 20, "batch")
    submit(core, "q-b2", 30, "batch")
    core.subscribe("fe0", p.Subscribe(next(_req), "k1/run1", 0, 3), 40)
    body = query(control, "admin.live", 1_000, history=True).body
    assert body["queue"]["depth"] == 3
    assert body["queue"]["by_priority"] == {"interactive": 1, "batch": 2}
    assert body["streams"] == {"open": 1}
    assert body["ready"] and body["admitting"]
    pools = {pl["id"]: pl for pl in body["pools"]}
    assert pools["a"]["queued"] == {"interactive": 1, "batch": 2}  # queued for their first pool
    assert pools["b"]["queued"] == {"interactive": 0, "batch": 0}
    assert (pools["a"]["active"], pools["a"]["slots"], pools["a"]["state"]) == (2, 2, "ready")
    assert [r["id"] for r in pools["a"]["replicas"]] == ["r0", "r1"]
    assert pools["a"]["replicas"][0]["engine_version"] == "m-1"
    tasks = {t["task_id"]: t for t in body["tasks"]}
    assert body["tasks_total"] == 6 and len(tasks) == 6
    assert tasks["k1/run1"]["client"] and tasks["k1/run1"]["frontend"] == 0
    assert tasks["k1/run1"]["state"] == "running" and tasks["k1/run1"]["running_ms"] == 1_000
    assert (tasks["k1/q-b2"]["state"], tasks["k1/q-b2"]["queue_ms"]) == ("queued", 970)
    assert not tasks["k1/q-b2"]["client"]
    assert body["gpus"] == []


def test_snapshot_lists_a_bounded_number_of_tasks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(livemod, "LIVE_MAX_TASKS", 4)
    core, control = make(ready=False)
    for i in range(7):
        submit(core, f"t{i}", i)
    body = query(control, "admin.live", 100).body
    assert [t["task_id"] for t in body["tasks"]] == [f"k1/t{i}" for i in range(4)]  # oldest
    assert body["tasks_total"] == 7


def test_a_snapshot_is_reused_briefly_but_gpus_are_always_current() -> None:
    core, control = make()
    first = query(control, "admin.live", 0).body
    submit(core, "t1", 1)
    core.recent.gpus.observe(2, [{"index": 0, "utilization": 0.25}])
    again = query(control, "admin.live", livemod.LIVE_CACHE_MS - 1).body
    assert again["totals"] == first["totals"]
    assert again["gpus"] == [{"index": 0, "utilization": 0.25}]
    fresh = query(control, "admin.live", livemod.LIVE_CACHE_MS).body
    assert fresh["totals"]["enqueued"] == first["totals"]["enqueued"] + 1
    assert "history" in query(control, "admin.live", 2_000, history=True).body["gpus"][0]


def test_pool_state_follows_drain_and_its_replicas() -> None:
    core, control = make(ready=False)
    body = query(control, "admin.live", 0).body
    assert [pl["state"] for pl in body["pools"]] == ["unready", "unready"]
    assert not body["ready"]
    core.replica_status("launcher", p.ReplicaStatus("r0", True, "mock", "m-1"), 0)
    query(control, "pool.drain", 0, pool_id="b", deadline_ms=0)
    body = query(control, "admin.live", 10_000).body
    assert [pl["state"] for pl in body["pools"]] == ["ready", "draining"]
    assert body["pools"][0]["replicas"][1]["state"] == "starting"
