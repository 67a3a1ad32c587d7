"""Admission in the scheduler core (orchd/core/scheduler.py): measured-throughput deadlines,
drop-lru, session budgets before enqueue, and the budgets reported on admission."""

from __future__ import annotations

from typing import Any

import pytest

from ipc import protocol as p
from orchd.core.placement import ReplicaView
from orchd.core.scheduler import SchedulerCore, State
from orchd.core.sessions import Limits, SessionTable

FE = "fe0"
T0 = 1000.0  # a start time other than 0: time 0 is a legal `now` but keep it out of the way


def make_core(*, queue_capacity: int = 8, slots: int = 2, **kw: Any) -> SchedulerCore:
    reps = [
        ReplicaView(id="r0", pool_id="default", engine="mock", slots=slots),
        ReplicaView(id="r1", pool_id="default", engine="mock", slots=slots),
    ]
    core = SchedulerCore(reps, queue_capacity=queue_capacity, **kw)
    for r in reps:
        core.replica_status(f"sup-{r.id}", p.ReplicaStatus(r.id, True, "mock", "mock-1.0"), 0)
    return core


def spec(tid: str, **kw: Any) -> p.TaskSpec:
    base: dict[str, Any] = {
        "task_id": tid,
        "session_id": f"s-{tid}",
        "workload": "completion",
        "model_ref": "mock:tiny",
        "engine": "mock",
        "ctx": 128,
        "priority": "interactive",
        "max_tokens": 16,
        "deadline_ms": 60_000,
        "api_key_id": "k1",
    }
    base.update(kw)
    return p.TaskSpec(**base)


_req = iter(range(1000, 10**9))


def submit(core: SchedulerCore, tid: str, now: float = T0, **kw: Any) -> list:
    return core.submit(FE, p.Submit(next(_req), spec(tid, **kw)), now)


def of(out: list, kind: type) -> list:
    return [m for _, m in out if isinstance(m, kind)]


def admitted(out: list) -> p.Admitted:
    (a,) = of(out, p.Admitted)
    return a


def failed(out: list) -> p.ErrorInfo:
    assert len(out) == 1, out
    (f,) = of(out, p.Failed)
    return f.error


def dispatched(out: list) -> list[str]:
    return [m.task.task_id for m in of(out, p.Dispatch)]


def ended(core: SchedulerCore, tid: str, now: float, tokens_out: int = 0, **kw: Any) -> list:
    t = core.tasks[tid]
    return core.task_ended(f"sup-{t.replica}", p.TaskEnded(tid, "stop", tokens_out, **kw), now)


def fill(core: SchedulerCore, now: float = T0) -> list[str]:
    n = sum(r.slots for r in core.replicas.values())
    tids = [f"t{i}" for i in range(n)]
    for tid in tids:
        assert dispatched(submit(core, tid, now)) == [tid]
    return tids


def measure(core: SchedulerCore, ttft: float = 20.0, tpot: float = 5.0, tokens: int = 101) -> None:
    """One finished task teaches the core its time to first token and time per token."""
    submit(core, "probe", T0)
    ended(
        core,
        "probe",
        T0 + 500,
        tokens_out=tokens,
        first_token_ms=ttft,
        decode_ms=ttft + (tokens - 1) * tpot,
    )


# ---------------------------------------------------------------- DEADLINE_UNMET


def test_no_deadline_verdict_without_a_measurement() -> None:
    core = make_core()
    assert core.tpot.samples == 0
    # Absurd deadline, but nothing has been measured: nothing to predict from.
    assert admitted(submit(core, "t1", max_tokens=10_000, deadline_ms=1))


def test_deadline_unmet_from_measured_tpot() -> None:
    core = make_core()
    measure(core, ttft=20.0, tpot=5.0)
    assert core.tpot.samples == 1
    assert core.tpot.mean_ms == pytest.approx(5.0)
    # Free slots: start now; 20 + 199 * 5 = 1015 ms > 1000.
    e = failed(submit(core, "late", max_tokens=200, deadline_ms=1000))
    assert e.code == "DEADLINE_UNMET"
    assert "predicted finish in 1015 ms" in e.message
    assert "1000 ms" in e.message and "200 tokens" in e.message
    assert e.message.startswith("deadline_ms:")
    assert "late" not in core.tasks
    assert "s-late" not in core.sessions.sessions  # refused before the session is touched
    assert core.stats.rejected == {("mock", "DEADLINE_UNMET"): 1}
    # 20 + 196 * 5 = 1000: on time.
    assert admitted(submit(core, "ok", max_tokens=197, deadline_ms=1000))


def test_deadline_uses_expected_tokens_when_given() -> None:
    core = make_core()
    measure(core, ttft=20.0, tpot=5.0)
    out = submit(core, "t1", max_tokens=1000, expected_tokens=50, deadline_ms=300)
    assert admitted(out)  # 20 + 49 * 5 = 265
    e = failed(submit(core, "t2", max_tokens=1000, expected_tokens=100, deadline_ms=300))
    assert e.code == "DEADLINE_UNMET" and "515 ms" in e.message


def test_deadline_counts_the_predicted_start() -> None:
    core = make_core()
    measure(core, ttft=20.0, tpot=5.0)  # and a service time of 500 ms
    assert core.service.mean_ms == 500
    fill(core)
    # No free slot: the start is one service time away; 500 + 20 + 9 * 5 = 565.
    e = failed(submit(core, "q1", max_tokens=10, deadline_ms=560))
    assert e.code == "DEADLINE_UNMET"
    assert "565 ms" in e.message and "start 500 ms" in e.message
    assert admitted(submit(core, "q2", max_tokens=10, deadline_ms=565)).predicted_start_ms == 500


def test_failed_tasks_teach_no_tpot() -> None:
    core = make_core()
    submit(core, "t1")
    ended(core, "t1", T0 + 10, tokens_out=50, first_token_ms=5.0, decode_ms=500.0, error_code="X")
    submit(core, "t2")
    ended(core, "t2", T0 + 20, tokens_out=1, first_token_ms=5.0, decode_ms=5.0)
    assert core.tpot.samples == 0
    assert admitted(submit(core, "t3", max_tokens=10_000, deadline_ms=1))


# ---------------------------------------------------------------- drop-lru


def test_drop_lru_unsubscribed_victim_fails_on_late_subscribe() -> None:
    core = make_core(queue_capacity=1, queue_policy="drop-lru")
    fill(core)
    submit(core, "b1", priority="batch", session_id="sv")
    sv = core.sessions.sessions["sv"]
    assert (sv.turns, sv.active) == (1, 1)
    out = submit(core, "i1", T0 + 1)
    a = admitted(out)
    assert (a.task_id, a.queue_position) == ("i1", 1)
    assert of(out, p.StreamFail) == []  # nobody streams b1 yet
    assert list(core.queue) == ["i1"]
    b1 = core.tasks["b1"]
    assert b1.state is State.ENDED
    assert b1.error is not None and b1.error.code == "QUEUE_FULL_DROP_LRU"
    assert b1.error.policy_label == "drop-lru"
    assert b1.error.retry_after_ms and b1.error.retry_after_ms > 0
    assert core.stats.backpressure == {"drop-lru": 1}
    assert core.stats.rejected == {("mock", "QUEUE_FULL_DROP_LRU"): 1}
    # Its session got the reservation and the turn back.
    assert (sv.turns, sv.active, sv.reserved_tokens) == (0, 0, 0)
    # The client subscribes later: its stream ends with the error.
    out = core.subscribe("fe1", p.Subscribe(5, "b1", 1, 9), T0 + 2)
    assert of(out, p.Subscribed)
    (sf,) = of(out, p.StreamFail)
    assert (sf.task_id, sf.slot, sf.error.code) == ("b1", 9, "QUEUE_FULL_DROP_LRU")


def test_drop_lru_subscribed_victim_gets_stream_fail() -> None:
    core = make_core(queue_capacity=2, queue_policy="drop-lru")
    fill(core)
    submit(core, "b1", priority="batch")
    submit(core, "b2", priority="batch")
    core.subscribe(FE, p.Subscribe(6, "b1", 0, 3), T0)
    out = submit(core, "b3", T0 + 1, priority="batch")
    assert admitted(out).task_id == "b3"
    (sf,) = of(out, p.StreamFail)
    assert (sf.task_id, sf.slot, sf.error.code) == ("b1", 3, "QUEUE_FULL_DROP_LRU")
    assert list(core.queue) == ["b2", "b3"]


def test_drop_lru_batch_newcomer_facing_interactive_only_is_rejected() -> None:
    core = make_core(queue_capacity=1, queue_policy="drop-lru")
    fill(core)
    submit(core, "i1")
    e = failed(submit(core, "b1", T0 + 1, priority="batch", session_id="sb"))
    assert (e.code, e.policy_label) == ("ADMISSION_REJECT", "drop-lru")
    assert core.stats.backpressure == {"drop-lru": 1}
    assert core.tasks["i1"].state is State.QUEUED
    sb = core.sessions.sessions["sb"]
    assert (sb.turns, sb.active, sb.reserved_tokens) == (0, 0, 0)


# ---------------------------------------------------------------- budgets before enqueue


def budget_core(**kw: Any) -> SchedulerCore:
    kw.setdefault("default", Limits(tokens=100, time_ms=5000.0, cost=10.0))
    sessions = SessionTable(cost_per_token=0.05, **kw)
    return make_core(sessions=sessions, cost_per_token=0.05)


def test_admitted_budgets_reflect_what_the_session_has_left() -> None:
    core = budget_core()
    a = admitted(submit(core, "t1", session_id="s", max_tokens=40))
    assert a.budgets == p.Budgets(60, 5000, pytest.approx(8.0))
    a = admitted(submit(core, "t2", session_id="s", max_tokens=10))
    assert a.budgets.tokens == 50
    assert a.budgets.cost == pytest.approx(7.5)
    # The subscriber sees the same.
    (sub,) = of(core.subscribe(FE, p.Subscribe(1, "t2", 0, 1), T0), p.Subscribed)
    assert sub.budgets == a.budgets
    # A session with no limits reports none.
    plain = make_core()
    assert admitted(submit(plain, "u1")).budgets == p.Budgets()


def test_token_budget_refused_before_enqueue_changes_nothing() -> None:
    core = budget_core()
    admitted(submit(core, "t1", session_id="s", max_tokens=80))
    s = core.sessions.sessions["s"]
    before = (s.turns, s.active, s.reserved_tokens, s.reserved_cost, s.tokens_left)
    e = failed(submit(core, "t2", session_id="s", max_tokens=21))
    assert (e.code, e.policy_label) == ("BUDGET_EXHAUSTED", "budget:tokens")
    assert (s.turns, s.active, s.reserved_tokens, s.reserved_cost, s.tokens_left) == before
    assert "t2" not in core.tasks and "t2" not in core.queue
    assert core.stats.rejected == {("mock", "BUDGET_EXHAUSTED"): 1}
    assert core.stats.backpressure == {}
    assert admitted(submit(core, "t3", session_id="s", max_tokens=20)).budgets.tokens == 0


def test_cost_and_time_budgets_refused_with_their_labels() -> None:
    core = budget_core(default=Limits(cost=1.0))
    e = failed(submit(core, "t1", session_id="s", max_tokens=21))  # 21 * 0.05 = 1.05
    assert (e.code, e.policy_label) == ("BUDGET_EXHAUSTED", "budget:cost")
    core = budget_core(default=Limits(time_ms=100.0))
    submit(core, "t1", T0, session_id="s")
    ended(core, "t1", T0 + 150, tokens_out=3)  # ran 150 ms: the time budget is spent
    assert core.sessions.sessions["s"].time_left_ms == -50.0
    e = failed(submit(core, "t2", T0 + 200, session_id="s"))
    assert (e.code, e.policy_label) == ("BUDGET_EXHAUSTED", "budget:time")


def test_turns_and_foreign_sessions_refused_before_enqueue() -> None:
    core = make_core(sessions=SessionTable(max_turns=2))
    submit(core, "t1", session_id="s")
    submit(core, "t2", session_id="s")
    e = failed(submit(core, "t3", session_id="s"))
    assert e.code == "INVALID_PARAMS" and "session_id" in e.message
    e = failed(submit(core, "t4", session_id="s", api_key_id="k2"))
    assert e.code == "FORBIDDEN"
    s = core.sessions.sessions["s"]
    assert (s.turns, s.active, s.owner) == (2, 2, "k1")
    assert "t3" not in core.tasks and "t4" not in core.tasks


def test_queue_full_gives_the_turn_and_reservation_back() -> None:
    core = make_core(queue_capacity=1, sessions=SessionTable(default=Limits(tokens=100)))
    fill(core)
    submit(core, "q1")
    e = failed(submit(core, "q2", session_id="s", max_tokens=30))
    assert e.code == "ADMISSION_REJECT"
    s = core.sessions.sessions["s"]
    assert (s.turns, s.active, s.reserved_tokens, s.tokens_available()) == (0, 0, 0, 100)


def test_cancel_while_queued_gives_the_turn_back() -> None:
    core = make_core(sessions=SessionTable(default=Limits(tokens=100)))
    fill(core)
    submit(core, "q1", session_id="s", max_tokens=30)
    core.cancel(FE, p.Cancel(1, "q1"), T0 + 1)
    s = core.sessions.sessions["s"]
    assert (s.turns, s.active, s.reserved_tokens, s.tokens_left) == (0, 0, 0, 100)


# ---------------------------------------------------------------- charged at the end


def test_end_charges_the_session() -> None:
    core = make_core(
        sessions=SessionTable(
            cost_per_token=0.1, default=Limits(tokens=100, time_ms=1000.0, cost=5.0)
        )
    )
    submit(core, "t1", T0, session_id="s", max_tokens=30)
    out = ended(core, "t1", T0 + 200, tokens_out=12, tokens_in=4)
    assert out == []
    s = core.sessions.sessions["s"]
    # Prompt and answer tokens are both charged: 4 + 12.
    assert (s.tokens_left, s.reserved_tokens, s.turns, s.active) == (84, 0, 1, 0)
    assert s.time_left_ms == 800.0
    assert s.cost_left == pytest.approx(3.4)
    assert s.kv_bytes == 16 * 1024
    assert s.last_replica == "r0"
    assert core.budgets("s") == p.Budgets(84, 800, pytest.approx(3.4))


def test_a_task_dispatched_at_time_zero_is_charged_at_its_end() -> None:
    """Time is passed in; 0 is a legal `now` (the colleague's tests use it throughout).
    SchedulerCore._end decides "did it run?" with `if t.started_ms:`, so a task dispatched
    at now=0 is treated as never started: its session is not charged and even gets its turn
    back (release instead of settle)."""
    core = make_core(sessions=SessionTable(default=Limits(tokens=100)))
    assert dispatched(submit(core, "t1", 0, session_id="s", max_tokens=30)) == ["t1"]
    ended(core, "t1", 200, tokens_out=12)
    s = core.sessions.sessions["s"]
    assert (s.tokens_left, s.turns) == (88, 1), (s.tokens_left, s.turns)


def test_next_task_of_a_session_prefers_its_kv_warm_replica() -> None:
    core = make_core()
    submit(core, "t1", T0, session_id="s")
    submit(core, "t2", T0, session_id="other")
    assert core.tasks["t2"].replica == "r1"
    ended(core, "t2", T0 + 5)
    ended(core, "t1", T0 + 10)  # session s was last on r0
    submit(core, "x", T0 + 11, session_id="x")  # default policy: r0 or r1
    out = submit(core, "t3", T0 + 12, session_id="s")
    (d,) = of(out, p.Dispatch)
    assert d.kv_warm is True and core.tasks["t3"].replica == "r0"
    assert "kv warm on r0" in d.placement_reason
    # kv_hint cold: no preference.
    out = submit(core, "t4", T0 + 13, session_id="s", kv_hint="cold")
    assert "kv warm" not in of(out, p.Dispatch)[0].placement_reason
