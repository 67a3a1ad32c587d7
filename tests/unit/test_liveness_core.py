"""Issue 12 in the scheduler core, event by event: no task waits for nothing (a model no pool
can load is refused, a queued task past its deadline ends, an unplaceable task blocks nobody),
and a replica that went quiet or came back is placed on accordingly."""

from __future__ import annotations

from typing import Any

from ipc import protocol as p
from orchd.core.placement import ReplicaView
from orchd.core.pools import UNREADY_RETRY_MS, UNREADY_RETRY_OPEN_MS, PoolState
from orchd.core.scheduler import SchedulerCore, State

FE = "fe0"
_req = iter(range(1, 10**9))


def core2(ready_bad: bool = False) -> SchedulerCore:
    """Pool "good" (mock:tiny, one slot on g0) and pool "bad" (mock:bad, one slot on b0)."""
    reps = [
        ReplicaView(id="g0", pool_id="good", engine="mock", slots=1),
        ReplicaView(id="b0", pool_id="bad", engine="mock", slots=1),
    ]
    pools = [
        PoolState("good", "mock", "mock:tiny", "", "v1", ["completion"], 1024),
        PoolState("bad", "mock", "mock:bad", "", "v1", ["completion"], 1024),
    ]
    core = SchedulerCore(reps, pools, queue_capacity=16)
    core.replica_status("sup-g0", p.ReplicaStatus("g0", True, "mock", "mock-1.0"), 0)
    if ready_bad:
        core.replica_status("sup-b0", p.ReplicaStatus("b0", True, "mock", "mock-1.0"), 0)
    return core


def spec(tid: str, model: str = "mock:tiny", **kw: Any) -> p.TaskSpec:
    fields: dict[str, Any] = {
        "task_id": tid,
        "session_id": f"s-{tid}",
        "workload": "completion",
        "model_ref": model,
        "engine": "mock",
        "ctx": 128,
        "priority": "interactive",
        "max_tokens": 16,
        "deadline_ms": 10_000,
        **kw,
    }
    return p.TaskSpec(**fields)


def submit(core: SchedulerCore, s: p.TaskSpec, now: float = 0) -> list[Any]:
    return core.submit(FE, p.Submit(next(_req), s), now)


def failed(out: list[Any]) -> p.ErrorInfo | None:
    errs = [m.error for _, m in out if isinstance(m, p.Failed)]
    return errs[0] if errs else None


def dispatched(out: list[Any]) -> list[str]:
    return [m.task.task_id for _, m in out if isinstance(m, p.Dispatch)]


def cannot_load(core: SchedulerCore, failures: int = 1, circuit_open: bool = False) -> None:
    st = p.ReplicaStatus(
        "b0",
        False,
        "mock",
        "",
        "engine failed to start: cannot load model mock:bad",
        start_failures=failures,
        circuit_open=circuit_open,
    )
    core.replica_status("sup-b0", st, 0)


# ---------------------------------------------------------------- POOL_UNREADY at admission


def test_a_model_no_replica_can_load_is_refused_503_pool_unready() -> None:
    """Issue 12, failure 3: such a task was accepted (202) and its stream hung forever."""
    core = core2()
    cannot_load(core)
    err = failed(submit(core, spec("t1", "mock:bad")))
    assert err is not None and err.code == "POOL_UNREADY"
    assert err.pool_id == "bad" and err.retry_after_ms == UNREADY_RETRY_MS
    assert "cannot load model" in err.message
    assert "t1" not in core.tasks and len(core.queue) == 0


def test_with_its_circuit_open_retry_after_is_the_cool_down() -> None:
    core = core2()
    cannot_load(core, failures=5, circuit_open=True)
    err = failed(submit(core, spec("t1", "mock:bad")))
    assert err is not None and err.retry_after_ms == UNREADY_RETRY_OPEN_MS


def test_a_replica_still_starting_or_restarting_after_a_crash_lets_the_task_wait() -> None:
    core = core2()  # b0 has not reported yet: it is starting
    assert failed(submit(core, spec("t1", "mock:bad"))) is None
    crashed = p.ReplicaStatus("b0", False, "mock", "mock-1.0", "engine died", start_failures=0)
    core.replica_status("sup-b0", crashed, 0)  # died after a stable run: restarting at once
    assert failed(submit(core, spec("t2", "mock:bad"))) is None
    assert core.tasks["t2"].state is State.QUEUED


# ---------------------------------------------------------------- deadlines in the queue


def test_a_queued_task_past_its_deadline_ends_deadline_unmet_and_leaves_the_queue() -> None:
    """Issue 12, failure 3: deadline_ms was never enforced while a task waited."""
    core = core2()
    assert dispatched(submit(core, spec("busy"))) == ["busy"]  # g0's only slot
    submit(core, spec("late", deadline_ms=500), now=100)
    assert core.tasks["late"].state is State.QUEUED
    assert core.tick(599) == [] and "late" in core.queue
    core.tick(600)
    t = core.tasks["late"]
    assert t.state is State.ENDED and t.end_reason == "error"
    assert t.error is not None and t.error.code == "DEADLINE_UNMET"
    assert "late" not in core.queue


def test_a_subscribed_stream_gets_the_deadline_error_as_its_terminal() -> None:
    core = core2()
    submit(core, spec("busy"))
    submit(core, spec("late", deadline_ms=500))
    core.subscribe(FE, p.Subscribe(next(_req), "late", 0, 7), 10)
    out = core.tick(500)
    ((peer, fail),) = [(x, m) for x, m in out if isinstance(m, p.StreamFail)]
    assert peer == FE and fail.slot == 7 and fail.error.code == "DEADLINE_UNMET"


# ---------------------------------------------------------------- no head-of-line blocking


def test_a_task_for_a_busy_pool_blocks_no_task_for_a_free_one_of_the_same_key() -> None:
    """Issue 12, failure 3: with one key, one task for a busy (or broken) pool stopped all
    traffic: the queue only looked at each key's head."""
    core = core2(ready_bad=True)
    assert dispatched(submit(core, spec("g-1"))) == ["g-1"]
    assert dispatched(submit(core, spec("g-2"))) == []  # queued: g0 is busy
    assert dispatched(submit(core, spec("b-1", "mock:bad"))) == ["b-1"]  # not behind g-2


def test_an_unloadable_pool_queue_blocks_nothing() -> None:
    core = core2()  # b0 starting: tasks for it queue
    submit(core, spec("b-1", "mock:bad"))
    submit(core, spec("b-2", "mock:bad"))
    assert dispatched(submit(core, spec("g-1"))) == ["g-1"]


def test_freed_slots_go_in_order_past_misfits() -> None:
    core = core2(ready_bad=True)
    submit(core, spec("g-1"))
    submit(core, spec("b-1", "mock:bad"))
    submit(core, spec("g-2"))
    submit(core, spec("b-2", "mock:bad"))
    submit(core, spec("g-3"))
    out = core.task_ended("sup-b0", p.TaskEnded("b-1", "stop", 3), 10)
    assert dispatched(out) == ["b-2"]
    out = core.task_ended("sup-g0", p.TaskEnded("g-1", "stop", 3), 11)
    assert dispatched(out) == ["g-2"]  # g-2 before g-3: FIFO among those that fit


# ---------------------------------------------------------------- quiet and rejoining replicas


def test_a_quiet_replica_gets_no_task_and_is_not_ready_in_health() -> None:
    core = core2()
    core.replicas["g0"].responsive = False
    assert dispatched(submit(core, spec("t1"))) == []
    h = core.pools.health("good", 1)
    assert not h["live"] and not h["ready"] and h["metrics"]["ready_replicas"] == 0
    core.replicas["g0"].responsive = True
    assert dispatched(core.dispatch(5)) == ["t1"]


def test_a_supervisor_taken_back_has_its_orphaned_tasks_aborted() -> None:
    core = core2()
    submit(core, spec("t1"))
    out = core.peer_down("sup-g0", "no heartbeat for 10.2s", 1000)
    assert core.tasks["t1"].error is not None
    assert core.tasks["t1"].error.code == "WORKER_RESET"
    h = core.pools.health("good", 0)
    assert not h["live"] and "no heartbeat" in h["last_error"]
    out = core.rejoined("g0", 2000)
    assert out == [("sup-g0", p.Abort(0, "t1", "worker_reset"))]
    assert core.rejoined("g0", 2001) == []  # once
    core.replica_status("sup-g0", p.ReplicaStatus("g0", True, "mock", "mock-1.0"), 2002)
    assert dispatched(submit(core, spec("t2"), now=2003)) == ["t2"]


def test_a_new_supervisor_process_has_nothing_to_abort() -> None:
    core = core2()
    submit(core, spec("t1"))
    core.peer_down("sup-g0", "watchdog: alive but no heartbeat for 30.2s", 1000)
    assert core.rejoined("g0", 2000, same_process=False) == []
    assert core.rejoined("g0", 2001) == []  # forgotten
    (rh,) = core.pools.health("good", 0)["metrics"]["replica_health"]
    assert rh["last_down"] == "watchdog: alive but no heartbeat for 30.2s"
    assert rh["live"] is False and rh["ready"] is False
