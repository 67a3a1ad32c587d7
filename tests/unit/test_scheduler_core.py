"""The scheduler state machine (orchd/core/scheduler.py), driven with messages and explicit time."""

from __future__ import annotations

from typing import Any

from ipc import protocol as p
from orchd.core.journal import End
from orchd.core.ownership import Stream
from orchd.core.placement import ReplicaView
from orchd.core.scheduler import SchedulerCore, State

FE = "fe0"


# ---------------------------------------------------------------- helpers


def make_core(*, ready: bool = True, queue_capacity: int = 8, **kw: Any) -> SchedulerCore:
    reps = [
        ReplicaView(id="r0", pool_id="default", engine="mock", slots=2),
        ReplicaView(id="r1", pool_id="default", engine="mock", slots=2),
    ]
    core = SchedulerCore(reps, queue_capacity=queue_capacity, **kw)
    if ready:
        for r in reps:
            out = core.replica_status(
                "launcher", p.ReplicaStatus(r.id, True, "mock", "mock-1.0"), 0
            )
            assert out == []
    return core


def spec(tid: str, priority: str = "interactive", engine: str = "mock") -> p.TaskSpec:
    return p.TaskSpec(
        task_id=tid,
        session_id=f"s-{tid}",
        workload="completion",
        model_ref="mock:tiny",
        engine=engine,
        ctx=128,
        priority=priority,
        max_tokens=16,
        deadline_ms=10_000,
    )


_req = iter(range(1000, 10**9))


def submit(
    core: SchedulerCore,
    tid: str,
    now: float = 0,
    priority: str = "interactive",
    engine: str = "mock",
    peer: str = FE,
) -> list:
    return core.submit(peer, p.Submit(next(_req), spec(tid, priority, engine)), now)


def of(out: list, kind: type) -> list:
    return [(peer, m) for peer, m in out if isinstance(m, kind)]


def only(out: list, kind: type) -> tuple[str, Any]:
    found = of(out, kind)
    assert len(found) == 1, out
    return found[0]


def dispatched(out: list) -> list[tuple[str, str]]:
    return [(peer, m.task.task_id) for peer, m in out if isinstance(m, p.Dispatch)]


def fill(core: SchedulerCore, now: float = 0) -> dict[str, str]:
    """Four tasks t1..t4 fill the four slots; returns task -> supervisor peer."""
    where = {}
    for i in range(1, 5):
        out = submit(core, f"t{i}", now)
        ((peer, tid),) = dispatched(out)
        where[tid] = peer
    return where


def sub(core: SchedulerCore, tid: str, slot: int, frontend: int = 0, now: float = 0) -> list:
    return core.subscribe(fe(frontend), p.Subscribe(next(_req), tid, frontend, slot), now)


def fe(i: int) -> str:
    return f"fe{i}"


def ended(core: SchedulerCore, tid: str, now: float, tokens_out: int = 0, **kw: Any) -> list:
    t = core.tasks[tid]
    return core.task_ended(f"sup-{t.replica}", p.TaskEnded(tid, "stop", tokens_out, **kw), now)


def aborted(core: SchedulerCore, peer: str, ab: p.Abort, now: float, tokens_out: int = 0) -> list:
    """What a supervisor that ran the task answers an Abort with: TaskEnded, then AbortDone."""
    out = core.task_ended(peer, p.TaskEnded(ab.task_id, "canceled", tokens_out), now)
    return out + core.abort_done(peer, p.AbortDone(ab.req_id, ab.task_id), now)


# ---------------------------------------------------------------- admission and dispatch


def test_submit_admits_and_dispatches() -> None:
    core = make_core()
    s = spec("t1")
    out = core.submit(FE, p.Submit(7, s), 0)
    assert [(peer, type(m)) for peer, m in out] == [(FE, p.Admitted), ("sup-r0", p.Dispatch)]
    adm, d = out[0][1], out[1][1]
    assert (adm.req_id, adm.task_id, adm.queue_position, adm.predicted_start_ms) == (7, "t1", 1, 0)
    assert d.task == s
    assert (d.queue_position, d.predicted_start_ms, d.frontend, d.slot) == (1, 0, -1, 0)
    t = core.tasks["t1"]
    assert t.state is State.RUNNING
    assert t.replica == "r0"
    assert core.replicas["r0"].active == {"t1"}
    assert core.queue_depth() == 0


def test_default_placement_spreads_over_replicas() -> None:
    core = make_core()
    assert fill(core) == {"t1": "sup-r0", "t2": "sup-r1", "t3": "sup-r0", "t4": "sup-r1"}
    assert core.replicas["r0"].active == {"t1", "t3"}
    assert core.replicas["r1"].active == {"t2", "t4"}


def test_no_dispatch_until_a_replica_is_ready() -> None:
    core = make_core(ready=False)
    out = submit(core, "t1")
    assert dispatched(out) == []
    assert only(out, p.Admitted)[1].task_id == "t1"
    assert core.tasks["t1"].state is State.QUEUED
    out = core.replica_status("launcher", p.ReplicaStatus("r1", True, "mock", "mock-1.0"), 5)
    assert dispatched(out) == [("sup-r1", "t1")]
    assert core.replicas["r1"].engine_version == "mock-1.0"
    # An unknown replica's status is ignored.
    assert core.replica_status("x", p.ReplicaStatus("zz", True, "mock", "v"), 5) == []


def test_queueing_when_full_and_dispatch_when_slot_frees() -> None:
    core = make_core()
    fill(core)
    out = submit(core, "q1")
    assert dispatched(out) == []
    adm = only(out, p.Admitted)[1]
    # No slot free: one service time (the 1000 ms prior) for the first wave.
    assert (adm.queue_position, adm.predicted_start_ms) == (1, 1000)
    adm2 = only(submit(core, "q2"), p.Admitted)[1]
    assert (adm2.queue_position, adm2.predicted_start_ms) == (2, 1000)
    assert core.queue_depth() == 2

    # t1 ends on r0 at 500 ms: q1 (head of the queue) takes its slot.
    out = ended(core, "t1", 500, tokens_out=10)
    assert [(peer, type(m)) for peer, m in out] == [("sup-r0", p.Dispatch)]
    d = out[0][1]
    assert d.task == spec("q1")
    assert (d.queue_position, d.predicted_start_ms, d.frontend, d.slot) == (1, 1000, -1, 0)
    assert core.tasks["t1"].state is State.ENDED
    assert core.tasks["q1"].state is State.RUNNING
    assert core.service.mean_ms == 500
    # t2 ends on r1: q2.
    assert dispatched(ended(core, "t2", 600)) == [("sup-r1", "q2")]
    assert core.queue_depth() == 0
    # Nothing queued: an end dispatches nothing.
    assert ended(core, "t3", 700) == []


def test_fifo_within_priority_and_interactive_first() -> None:
    core = make_core()
    fill(core)
    assert only(submit(core, "b1", priority="batch"), p.Admitted)[1].queue_position == 1
    assert only(submit(core, "i1"), p.Admitted)[1].queue_position == 1
    assert only(submit(core, "b2", priority="batch"), p.Admitted)[1].queue_position == 3
    assert only(submit(core, "i2"), p.Admitted)[1].queue_position == 2
    order = []
    for i, tid in enumerate(["t1", "t2", "t3", "t4"]):
        order += [t for _, t in dispatched(ended(core, tid, 100 + i))]
    assert order == ["i1", "i2", "b1", "b2"]


def test_dispatch_carries_subscriber_of_queued_task() -> None:
    core = make_core()
    fill(core)
    submit(core, "q1")
    out = sub(core, "q1", slot=7)
    assert out == [(FE, p.Subscribed(out[0][1].req_id, "q1"))]  # no Attach: not running yet
    out = ended(core, "t1", 10)
    peer, d = only(out, p.Dispatch)
    assert (peer, d.frontend, d.slot) == ("sup-r0", 0, 7)
    assert core.tasks["q1"].stream is Stream.ATTACHED


def test_unknown_engine_is_invalid_params() -> None:
    core = make_core()
    out = core.submit(FE, p.Submit(3, spec("t1", engine="vllm")), 0)
    assert len(out) == 1
    peer, f = out[0]
    assert peer == FE and isinstance(f, p.Failed) and f.req_id == 3
    assert f.error.code == "INVALID_PARAMS"
    assert "vllm" in f.error.message and "mock" in f.error.message
    assert "t1" not in core.tasks
    assert core.stats.rejected == {("vllm", "INVALID_PARAMS"): 1}
    assert core.stats.enqueued == 0


def test_duplicate_task_id_fails() -> None:
    core = make_core()
    submit(core, "t1")
    out = core.submit(FE, p.Submit(4, spec("t1")), 1)
    assert len(out) == 1
    _, f = out[0]
    assert isinstance(f, p.Failed) and f.req_id == 4
    assert f.error.code == "INVALID_PARAMS"
    assert "already exists" in f.error.message
    # Still a duplicate once it has ended (until retention forgets it).
    ended(core, "t1", 5)
    _, f = only(submit(core, "t1", 6), p.Failed)
    assert f.error.code == "INVALID_PARAMS"
    assert core.stats.started == 1


def test_queue_full_is_admission_reject() -> None:
    core = make_core(queue_capacity=1)
    fill(core)
    submit(core, "q1")
    out = core.submit(FE, p.Submit(9, spec("q2")), 0)
    assert len(out) == 1
    peer, f = out[0]
    assert peer == FE and isinstance(f, p.Failed) and f.req_id == 9
    assert f.error.code == "ADMISSION_REJECT"
    assert f.error.policy_label == "reject"
    # Four slots, a 1000 ms service time: a slot frees every 250 ms.
    assert f.error.retry_after_ms == 250
    assert "q2" not in core.tasks
    assert core.stats.rejected == {("mock", "ADMISSION_REJECT"): 1}
    # Room again once the queue moves.
    ended(core, "t1", 1)
    assert only(submit(core, "q2", 2), p.Admitted)[1].task_id == "q2"


def test_drop_lru_fails_the_dropped_task() -> None:
    """DESIGN §4: under drop-lru 'the dropped task's stream gets error QUEUE_FULL_DROP_LRU'.
    The dropped task must end (not stay QUEUED forever, out of the queue) and its subscriber
    must get a StreamFail with that code."""
    core = make_core(queue_capacity=1, queue_policy="drop-lru")
    fill(core)
    submit(core, "b1", priority="batch")
    sub(core, "b1", slot=3)
    out = submit(core, "i1", 1)
    assert only(out, p.Admitted)[1].task_id == "i1"
    assert core.tasks["b1"].state is State.ENDED, "dropped task left in state QUEUED"
    peer, sf = only(out, p.StreamFail)
    assert (peer, sf.slot, sf.task_id) == (FE, 3, "b1")
    assert sf.error.code == "QUEUE_FULL_DROP_LRU"


# ---------------------------------------------------------------- subscribe


def test_subscribe_unknown_is_not_found() -> None:
    core = make_core()
    out = core.subscribe(FE, p.Subscribe(5, "nope", 0, 1), 0)
    assert len(out) == 1
    peer, f = out[0]
    assert peer == FE and isinstance(f, p.Failed) and f.req_id == 5
    assert f.error.code == "NOT_FOUND"


def test_subscribe_twice_is_a_conflict() -> None:
    core = make_core()
    submit(core, "t1")
    assert of(core.subscribe(FE, p.Subscribe(5, "t1", 0, 1), 0), p.Subscribed)
    out = core.subscribe("fe1", p.Subscribe(6, "t1", 1, 2), 0)
    assert len(out) == 1
    peer, f = out[0]
    assert peer == "fe1" and isinstance(f, p.Failed) and f.req_id == 6
    assert f.error.code == "STREAM_CONFLICT"  # 409; with Last-Event-ID it takes over
    # The first subscriber keeps the stream.
    assert (core.tasks["t1"].frontend, core.tasks["t1"].slot) == (0, 1)


def test_subscribe_running_task_attaches_supervisor() -> None:
    core = make_core()
    submit(core, "t1")
    submit(core, "t2")
    out = core.subscribe("fe1", p.Subscribe(11, "t2", 1, 42), 3)
    assert out == [
        ("fe1", p.Subscribed(11, "t2")),
        ("sup-r1", p.Attach("t2", frontend=1, slot=42)),
    ]
    assert core.tasks["t2"].stream is Stream.ATTACHED


def test_subscribe_ended_task_replays_from_supervisor() -> None:
    core = make_core()
    submit(core, "t1")
    ended(core, "t1", 10)
    out = core.subscribe(FE, p.Subscribe(12, "t1", 0, 4), 11)
    assert out == [(FE, p.Subscribed(12, "t1")), ("sup-r0", p.Attach("t1", 0, 4))]
    assert core.tasks["t1"].stream is Stream.TERMINAL_PENDING


def test_subscribe_canceled_queued_task_gets_end_from_frontend() -> None:
    core = make_core()
    fill(core)
    submit(core, "q1")
    assert core.cancel("fe1", p.Cancel(20, "q1"), 1) == [("fe1", p.Done(20))]
    out = core.subscribe(FE, p.Subscribe(21, "q1", 0, 6), 2)
    assert out[0] == (FE, p.Subscribed(21, "q1"))
    peer, se = only(out, p.StreamEnd)
    assert (peer, se.slot, se.task_id, se.reason) == (FE, 6, "q1", "canceled")


# ---------------------------------------------------------------- cancel


def test_cancel_queued_subscribed_task() -> None:
    core = make_core()
    fill(core)
    submit(core, "q1")
    submit(core, "q2")
    sub(core, "q1", slot=3)
    out = core.cancel(FE, p.Cancel(50, "q1"), 5)
    assert len(out) == 1
    peer, se = out[0]
    assert peer == FE and isinstance(se, p.StreamEnd)
    assert (se.slot, se.task_id, se.reason) == (3, "q1", "canceled")
    assert core.tasks["q1"].state is State.ENDED
    assert "q1" not in core.queue
    assert list(core.queue) == ["q2"]
    assert core.stats.canceled == {"client": 1}
    # The cancel is answered only once the frontend has put the end frame on the wire.
    assert core.fence_done(FE, p.FenceDone(se.req_id), 6) == [(FE, p.Done(50))]
    # A stale or repeated FenceDone answers nothing.
    assert core.fence_done(FE, p.FenceDone(se.req_id), 7) == []
    # q2 moved up: it is next when a slot frees.
    assert dispatched(ended(core, "t1", 8)) == [("sup-r0", "q2")]


def test_cancel_queued_unsubscribed_task_is_done_at_once() -> None:
    core = make_core()
    fill(core)
    submit(core, "q1")
    assert core.cancel("fe1", p.Cancel(51, "q1", reason="deadline"), 5) == [("fe1", p.Done(51))]
    assert core.stats.canceled == {"deadline": 1}


def test_cancel_running_subscribed_task() -> None:
    core = make_core()
    submit(core, "t1")
    sub(core, "t1", slot=2)
    out = core.cancel(FE, p.Cancel(60, "t1"), 10)
    assert len(out) == 1
    peer, ab = out[0]
    assert peer == "sup-r0" and isinstance(ab, p.Abort)
    assert (ab.task_id, ab.reason) == ("t1", "client")
    assert core.tasks["t1"].state is State.RUNNING  # until the supervisor says so

    out = aborted(core, "sup-r0", ab, 20, tokens_out=5)
    assert len(out) == 1
    peer, fence = out[0]
    assert peer == FE and isinstance(fence, p.Fence) and fence.slot == 2
    assert core.tasks["t1"].state is State.ENDED
    assert core.replicas["r0"].active == set()
    assert core.stats.tokens_out == 5

    assert core.fence_done(FE, p.FenceDone(fence.req_id), 21) == [(FE, p.Done(60))]


def test_cancel_running_unsubscribed_task_done_after_abort_done() -> None:
    core = make_core()
    submit(core, "t1")
    ((peer, ab),) = core.cancel("fe1", p.Cancel(61, "t1"), 10)
    assert peer == "sup-r0" and isinstance(ab, p.Abort)
    out = aborted(core, "sup-r0", ab, 11)
    assert out == [("fe1", p.Done(61))]


def test_abort_done_frees_slot_for_queued_work() -> None:
    core = make_core()
    fill(core)
    submit(core, "q1")
    ((_, ab),) = core.cancel("fe1", p.Cancel(62, "t2"), 10)
    out = aborted(core, "sup-r1", ab, 11)
    assert dispatched(out) == [("sup-r1", "q1")]
    assert ("fe1", p.Done(62)) in out


def test_second_cancel_while_aborting_sends_no_second_abort() -> None:
    core = make_core()
    submit(core, "t1")
    ((_, ab),) = core.cancel("fe1", p.Cancel(70, "t1"), 10)
    assert core.cancel(FE, p.Cancel(71, "t1"), 11) == []
    out = aborted(core, "sup-r0", ab, 12)
    assert sorted(out, key=lambda x: x[0]) == [(FE, p.Done(71)), ("fe1", p.Done(70))]
    assert core.stats.canceled == {"client": 1}


def test_cancel_of_ended_task_is_answered() -> None:
    core = make_core()
    submit(core, "t1")
    ended(core, "t1", 5)
    assert core.cancel("fe1", p.Cancel(80, "t1"), 6) == [("fe1", p.Done(80))]
    assert core.stats.canceled == {}


def test_cancel_of_ended_streamed_task_waits_for_fence() -> None:
    core = make_core()
    submit(core, "t1")
    sub(core, "t1", slot=9)
    assert ended(core, "t1", 5) == []
    out = core.cancel(FE, p.Cancel(81, "t1"), 6)
    ((peer, fence),) = out
    assert peer == FE and isinstance(fence, p.Fence) and fence.slot == 9
    assert core.fence_done(FE, p.FenceDone(fence.req_id), 7) == [(FE, p.Done(81))]


def test_cancel_unknown_task_is_not_found() -> None:
    core = make_core()
    ((peer, f),) = core.cancel(FE, p.Cancel(82, "ghost"), 0)
    assert peer == FE and isinstance(f, p.Failed) and f.error.code == "NOT_FOUND"


def test_task_ended_during_abort_still_answers_cancel() -> None:
    core = make_core()
    submit(core, "t1")
    ((_, ab),) = core.cancel("fe1", p.Cancel(83, "t1"), 10)
    # The task finished on its own before the abort landed.
    assert ended(core, "t1", 11) == [("fe1", p.Done(83))]
    assert core.abort_done("sup-r0", p.AbortDone(ab.req_id, "t1"), 12) == []
    # Unknown abort ids and tasks are ignored.
    assert core.abort_done("sup-r0", p.AbortDone(999_999, "ghost"), 13) == []


# ---------------------------------------------------------------- peers going down


def test_supervisor_down_fails_streams_and_moves_work() -> None:
    core = make_core()
    where = fill(core)
    assert where["t1"] == "sup-r0" and where["t3"] == "sup-r0"
    submit(core, "q1")
    sub(core, "t1", slot=4)

    out = core.peer_down("sup-r0", "exit status 1", 100)
    peer, sf = only(out, p.StreamFail)
    assert (peer, sf.slot, sf.task_id) == (FE, 4, "t1")
    assert sf.error.code == "WORKER_RESET"
    assert sf.error.engine == "mock"
    assert sf.error.pool_id == "default"
    assert "exit status 1" in sf.error.message
    assert dispatched(out) == []  # nothing goes to the dead replica

    r0 = core.replicas["r0"]
    assert not r0.ready
    assert r0.last_error == "exit status 1"
    assert r0.active == set()
    for tid in ("t1", "t3"):
        assert core.tasks[tid].state is State.ENDED
        assert core.tasks[tid].error is not None
    assert core.tasks["t2"].state is State.RUNNING

    # The frontend wrote the error frame; nothing to answer.
    assert core.fence_done(FE, p.FenceDone(sf.req_id), 101) == []
    # Queued work goes to r1 as soon as r1 has room.
    assert dispatched(ended(core, "t2", 200)) == [("sup-r1", "q1")]
    # A late subscriber to t3 (unsubscribed when r0 died) gets the error from the frontend.
    out = sub(core, "t3", slot=8, now=201)
    peer, sf3 = only(out, p.StreamFail)
    assert (peer, sf3.slot, sf3.error.code) == (FE, 8, "WORKER_RESET")
    assert of(out, p.Attach) == []
    # When r0 comes back, it takes work again.
    submit(core, "q2", 300)
    out = core.replica_status("sup-r0", p.ReplicaStatus("r0", True, "mock", "mock-1.0"), 301)
    assert dispatched(out) == [("sup-r0", "q2")]


def test_supervisor_down_answers_pending_cancel() -> None:
    core = make_core()
    submit(core, "t1")
    sub(core, "t1", slot=4)
    ((_, ab),) = core.cancel("fe1", p.Cancel(90, "t1"), 10)
    out = core.peer_down("sup-r0", "killed", 11)
    peer, sf = only(out, p.StreamFail)
    assert peer == FE and sf.error.code == "WORKER_RESET"
    assert of(out, p.Done) == []
    assert core.fence_done(FE, p.FenceDone(sf.req_id), 12) == [("fe1", p.Done(90))]
    # The abort died with the supervisor: its late answer does nothing.
    assert core.abort_done("sup-r0", p.AbortDone(ab.req_id, "t1"), 13) == []


def test_unknown_peer_down_is_ignored() -> None:
    core = make_core()
    submit(core, "t1")
    assert core.peer_down("sup-zz", "gone", 1) == []
    assert core.peer_down("launcher", "gone", 1) == []
    assert core.tasks["t1"].state is State.RUNNING


def test_frontend_down_detaches_its_running_streams_then_ends_them_retriably() -> None:
    core = make_core(resume_grace_ms=1000)
    submit(core, "t1")
    submit(core, "t2")
    submit(core, "t3")
    sub(core, "t1", slot=1, frontend=0)
    sub(core, "t2", slot=1, frontend=1)
    out = core.peer_down("fe0", "exit", 50)
    # Its supervisor stops feeding it; the frontend (if only paused) is told to end the
    # stream with a retriable error; the task runs on for the grace period.
    assert ("sup-r0", p.Detach("t1")) in out
    ((peer, sf),) = of(out, p.StreamFail)
    assert peer == "fe0" and sf.error.code == "STREAM_INTERRUPTED"
    assert core.tasks["t1"].stream is Stream.DETACHED
    assert core.tick(1049) == [] and core.tasks["t1"].state is State.RUNNING
    ((peer, ab),) = of(core.tick(1050), p.Abort)
    assert peer == "sup-r0" and (ab.task_id, ab.reason) == ("t1", "frontend_lost")
    assert core.stats.canceled == {"frontend_lost": 1}
    # Only fe0's streams: t2 (fe1) and t3 (nobody) keep running.
    assert core.tasks["t2"].state is State.RUNNING
    assert core.tasks["t3"].state is State.RUNNING
    out = aborted(core, "sup-r0", ab, 1051)
    assert [peer for peer, _ in out if peer == "fe0"] == []  # nobody left to fence
    assert core.tasks["t1"].state is State.ENDED


def test_frontend_down_answers_cancels_waiting_on_its_fence() -> None:
    core = make_core()
    fill(core)
    submit(core, "q1")
    sub(core, "q1", slot=3)
    ((_, se),) = core.cancel("fe1", p.Cancel(95, "q1"), 5)
    assert isinstance(se, p.StreamEnd)
    # fe0 dies before answering the fence: the canceller still gets its answer.
    out = core.peer_down("fe0", "exit", 6)
    assert ("fe1", p.Done(95)) in out


def test_frontend_down_with_queued_stream_does_not_block_drain() -> None:
    """A queued task streamed by a frontend that dies fails (retriably) once its grace passes.
    The frontend is gone, so no fence to it may stay outstanding: otherwise drain_all waits
    forever for a FenceDone."""
    core = make_core(resume_grace_ms=5)
    fill(core)
    submit(core, "q1")
    sub(core, "q1", slot=3)
    core.peer_down("fe0", "exit", 10)
    core.tick(15)
    assert core.tasks["q1"].state is State.ENDED
    assert core.tasks["q1"].error is not None
    assert core.tasks["q1"].error.code == "STREAM_INTERRUPTED"
    for i, tid in enumerate(["t1", "t2", "t3", "t4"]):
        ended(core, tid, 20 + i)
    out = core.drain_all("launcher", p.DrainAll(77, deadline_ms=1000), 30)
    out += core.tick(2000)  # even well past the deadline
    assert ("launcher", p.Done(77)) in out


# ---------------------------------------------------------------- drain and time


def test_drain_all_idle_answers_at_once() -> None:
    core = make_core()
    assert core.drain_all("launcher", p.DrainAll(1, deadline_ms=1000), 0) == [
        ("launcher", p.Done(1))
    ]
    assert not core.admitting


def test_drain_all_stops_admission_and_waits_for_running_work() -> None:
    core = make_core()
    submit(core, "t1")
    assert core.drain_all("launcher", p.DrainAll(70, deadline_ms=5000), 100) == []
    ((peer, f),) = core.submit(FE, p.Submit(71, spec("late")), 101)
    assert peer == FE and isinstance(f, p.Failed)
    assert f.error.code == "POOL_UNAVAILABLE"
    assert "late" not in core.tasks
    assert core.tick(200) == []
    assert ended(core, "t1", 300) == []
    assert core.tick(301) == [("launcher", p.Done(70))]
    # Answered once.
    assert core.tick(302) == []


def test_drain_lets_queued_work_run_before_the_deadline() -> None:
    core = make_core()
    fill(core)
    submit(core, "q1")
    assert core.drain_all("launcher", p.DrainAll(72, deadline_ms=5000), 0) == []
    assert dispatched(ended(core, "t1", 10)) == [("sup-r0", "q1")]


def test_drain_deadline_keeps_queued_in_the_journal_and_aborts_running() -> None:
    core = make_core()
    fill(core)
    submit(core, "q1")
    submit(core, "q2")
    sub(core, "q1", slot=5)
    assert core.drain_all("launcher", p.DrainAll(73, deadline_ms=1000), 0) == []
    assert core.tick(999) == []
    core.records.clear()

    out = core.tick(1000)
    assert of(out, p.StreamFail) == []  # the queued tasks are not failed ...
    aborts = of(out, p.Abort)
    assert sorted(m.task_id for _, m in aborts) == ["t1", "t2", "t3", "t4"]
    assert all(m.reason == "shutdown" for _, m in aborts)
    assert of(out, p.Done) == []
    assert core.tasks["q1"].state is State.QUEUED  # ... they stay queued, and journaled:
    assert core.tasks["q2"].state is State.QUEUED
    assert not any(isinstance(r, End) and r.task_id.startswith("q") for r in core.records)
    assert core.queue_depth() == 2

    # Aborts are not repeated by later ticks.
    assert of(core.tick(1001), p.Abort) == []
    for peer, ab in aborts:
        out = aborted(core, peer, ab, 1002)
        assert of(out, p.Dispatch) == []  # freed slots take nothing more past the deadline
    assert core.tick(1005) == [("launcher", p.Done(73))]
    assert core.stats.canceled == {"shutdown": 4}


def test_tick_forgets_ended_tasks_after_retention() -> None:
    core = make_core(retention_ms=1000)
    submit(core, "t1")
    submit(core, "t2")
    ended(core, "t1", 100)
    ended(core, "t2", 500)
    assert core.tick(1099) == []
    assert set(core.tasks) == {"t1", "t2"}
    core.tick(1100)
    assert set(core.tasks) == {"t2"}
    ((_, f),) = core.subscribe(FE, p.Subscribe(1, "t1", 0, 0), 1101)
    assert isinstance(f, p.Failed) and f.error.code == "NOT_FOUND"
    # The id can be used again.
    assert of(submit(core, "t1", 1102), p.Admitted)
    core.tick(1500)
    assert "t2" not in core.tasks
    assert "t1" in core.tasks  # the new t1 is running


def test_task_fencing_at_retention_time_is_forgotten_later() -> None:
    """A task whose cancel is still waiting on a fence when its retention runs out must be
    forgotten once the fence is answered, not kept for ever."""
    core = make_core(retention_ms=1000)
    submit(core, "t1")
    sub(core, "t1", slot=2)
    ended(core, "t1", 0)
    ((_, fence),) = core.cancel("fe1", p.Cancel(300, "t1"), 999)
    assert isinstance(fence, p.Fence)
    core.tick(1000)
    assert "t1" in core.tasks  # still owed an answer: kept
    assert core.fence_done(FE, p.FenceDone(fence.req_id), 1001) == [("fe1", p.Done(300))]
    core.tick(1_000_000)
    assert "t1" not in core.tasks, "ended task leaked: never forgotten after its fence"


def test_tick_keeps_running_tasks() -> None:
    core = make_core(retention_ms=10)
    submit(core, "t1")
    core.tick(1_000_000)
    assert core.tasks["t1"].state is State.RUNNING


# ---------------------------------------------------------------- stats


def test_stats_counters() -> None:
    core = make_core(queue_capacity=1)
    fill(core)  # 4 enqueued, 4 started
    submit(core, "q1")  # enqueued, not started
    submit(core, "q2")  # rejected: queue full
    submit(core, "x", engine="tgi")  # rejected: unknown engine
    s = core.stats
    assert (s.enqueued, s.started) == (5, 4)
    assert s.rejected == {("mock", "ADMISSION_REJECT"): 1, ("tgi", "INVALID_PARAMS"): 1}

    ended(core, "t1", 100, tokens_out=7, tokens_in=3, first_token_ms=4.5, decode_ms=90.0)
    assert (s.started, s.tokens_out, s.tokens_in) == (5, 7, 3)
    assert s.first_token_ms == [4.5]
    assert s.decode_ms == [90.0]

    ((_, ab),) = core.cancel(FE, p.Cancel(1, "t2"), 110)
    aborted(core, "sup-r1", ab, 120, tokens_out=4)
    assert s.tokens_out == 11
    assert s.canceled == {"client": 1}
    core.cancel(FE, p.Cancel(2, "t3", reason="deadline"), 130)
    assert s.canceled == {"client": 1, "deadline": 1}
    # A TaskEnded for an ended or unknown task counts nothing.
    assert core.task_ended("sup-r0", p.TaskEnded("t1", "stop", 100), 140) == []
    assert core.task_ended("sup-r0", p.TaskEnded("ghost", "stop", 100), 140) == []
    assert s.tokens_out == 11
    assert s.started == 5  # q1 took t1's slot; nothing was left queued for t2's
