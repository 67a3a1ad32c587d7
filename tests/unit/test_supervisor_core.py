"""The supervisor's rules (engine_procs/supervisor_core.py), driven event by event with
explicit time: no process, socket or event loop."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest

from engine_procs.supervisor_core import SupervisorCore
from engine_procs.supervisor_effects import (
    AbortRequest,
    Effect,
    PauseReading,
    PrepareEngine,
    Send,
    StartEngine,
    StopEngine,
    Submit,
)
from ipc import protocol as p
from ipc.frames import KIND_DATA, KIND_TERMINAL, json_string
from orchd.config import Config, Replica
from orchd.core.ownership import Stream

T0 = 100.0


def make_core(
    *, ready: bool = True, replica: dict[str, Any] | None = None, **sections: dict[str, Any]
) -> SupervisorCore:
    cfg = msgspec.convert(
        {
            "scheduling": {"metrics_interval_ms": 0, **sections.pop("scheduling", {})},
            **sections,
        },
        Config,
    )
    rep = msgspec.convert({"id": "r0", **(replica or {})}, Replica)
    core = SupervisorCore(cfg, rep, now=T0, random_seed=lambda: 42)
    core.start()
    assert core.take() == [StartEngine(0, 0.0)]
    if ready:
        core.engine_ready(0, "mock-1.0", T0)
        core.take()
    return core


def spec(tid: str = "t1", **kw: Any) -> p.TaskSpec:
    base: dict[str, Any] = {
        "task_id": tid,
        "session_id": "s",
        "workload": "completion",
        "model_ref": "mock:tiny",
        "engine": "mock",
        "ctx": 128,
        "priority": "interactive",
        "max_tokens": 16,
        "deadline_ms": 10_000,
        "prompt": "hi",
    }
    return p.TaskSpec(**{**base, **kw})


def dispatch(
    core: SupervisorCore,
    tid: str = "t1",
    now: float = T0,
    *,
    frontend: int = 0,
    slot: int = 7,
    provisional: bool = False,
    **kw: Any,
) -> list[Effect]:
    msg = p.Dispatch(spec(tid), 1, 0, frontend, slot, provisional=provisional, **kw)
    core.on_message(msg, now)
    return core.take()


def rid_of(core: SupervisorCore, tid: str = "t1") -> int:
    return core.runs[tid].rid


def toks(core: SupervisorCore, tid: str, n: int, now: float) -> None:
    core.tokens(rid_of(core, tid), [json_string(f"w{i}") for i in range(n)], now)


def events(payload: bytes) -> list[tuple[str, int, dict[str, Any]]]:
    """(event, id, data) of each SSE frame in a record's payload."""
    out = []
    for block in payload.decode().split("\n\n"):
        if not block:
            continue
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((fields["event"], int(fields["id"]), json.loads(fields["data"])))
    return out


def sent(effects: list[Effect], kind: type) -> list[Any]:
    return [e.msg for e in effects if isinstance(e, Send) and isinstance(e.msg, kind)]


# ---------------------------------------------------------------- dispatch and streaming


def test_dispatch_submits_to_the_engine_before_the_started_frame() -> None:
    core = make_core()
    effects = dispatch(core)
    (sub,) = [e for e in effects if isinstance(e, Submit)]
    assert (sub.engine, sub.req.prompt, sub.req.seed, sub.req.max_tokens) == (0, "hi", 42, 16)
    ((fe, slot, seq, kind, payload),) = core.flush()
    assert (fe, slot, seq, kind) == (0, 7, 0, KIND_DATA)
    ((event, eid, data),) = events(payload)
    assert (event, eid, data["replica_id"], data["engine_version"]) == (
        "started",
        0,
        "r0",
        "mock-1.0",
    )
    assert core.runs["t1"].stream is Stream.ATTACHED


def test_an_engine_step_is_one_record_per_stream() -> None:
    core = make_core()
    dispatch(core, "t1", slot=1)
    dispatch(core, "t2", slot=2)
    core.flush()
    toks(core, "t1", 3, T0 + 0.01)
    toks(core, "t2", 1, T0 + 0.01)
    toks(core, "t1", 2, T0 + 0.01)
    records = core.flush()
    assert [(r[1], r[2]) for r in records] == [(1, 5), (2, 1)]
    assert [(e, i, d["i"]) for e, i, d in events(records[0][4])] == [
        ("token", n + 1, n) for n in range(5)
    ]
    assert core.flush() == []  # nothing new


def test_an_unstreamed_task_keeps_its_transcript_and_a_subscriber_gets_it_all() -> None:
    core = make_core()
    dispatch(core, frontend=-1)
    toks(core, "t1", 2, T0 + 0.01)
    assert core.flush() == []
    assert core.runs["t1"].stream is Stream.NONE
    core.on_message(p.Attach("t1", 1, 9), T0 + 0.02)
    ((fe, slot, seq, kind, payload),) = core.flush()
    assert (fe, slot, seq, kind) == (1, 9, 2, KIND_DATA)
    assert [e for e, _, _ in events(payload)] == ["started", "token", "token"]
    toks(core, "t1", 1, T0 + 0.03)  # then live
    ((_, _, seq, _, payload),) = core.flush()
    assert seq == 3 and [e for e, _, _ in events(payload)] == ["token"]


def test_a_subscriber_after_the_end_gets_the_whole_transcript_as_terminal() -> None:
    core = make_core()
    dispatch(core, frontend=-1)
    toks(core, "t1", 1, T0 + 0.01)
    core.finish(rid_of(core), "stop", T0 + 0.02)
    core.take()
    core.on_message(p.Attach("t1", 0, 3), T0 + 0.03)
    ((_, slot, _, kind, payload),) = core.flush()
    assert (slot, kind) == (3, KIND_TERMINAL)
    assert [e for e, _, _ in events(payload)] == ["started", "token", "end"]
    assert "t1" in core.ended  # delivered, and kept: its client may resume


def test_a_provisional_stream_is_fed_and_its_transcript_kept_once_claimed() -> None:
    core = make_core()
    dispatch(core, provisional=True)
    assert core.runs["t1"].stream is Stream.PROVISIONAL
    core.finish(rid_of(core), "length", T0 + 0.01)
    ((_, _, _, kind, _),) = core.flush()
    assert kind == KIND_TERMINAL
    run = core.ended["t1"]
    assert run.stream is Stream.PROVISIONAL_ENDED and run.transcript  # kept for a replay
    core.on_message(p.Claim("t1"), T0 + 0.02)
    assert run.stream is Stream.TERMINAL_PENDING and run.transcript  # kept for a resume
    assert "t1" in core.ended


def test_a_detached_provisional_stream_is_fed_no_more() -> None:
    core = make_core()
    dispatch(core, provisional=True)
    core.flush()
    core.on_message(p.Detach("t1"), T0 + 0.01)
    toks(core, "t1", 2, T0 + 0.02)
    assert core.flush() == []
    assert core.runs["t1"].stream is Stream.NONE
    assert len(core.runs["t1"].transcript) == 3


def test_attach_of_a_forgotten_task_ends_its_stream_with_an_error() -> None:
    core = make_core()
    core.on_message(p.Attach("ghost", 0, 5), T0)
    ((fe, slot, _, kind, payload),) = core.flush()
    assert (fe, slot, kind) == (0, 5, KIND_TERMINAL)
    ((event, _, data),) = events(payload)
    assert (event, data["code"]) == ("error", "INTERNAL")


def test_late_tokens_after_an_end_reach_no_stream() -> None:
    core = make_core()
    dispatch(core)
    rid = rid_of(core)
    core.finish(rid, "stop", T0 + 0.01)
    core.flush()
    core.tokens(rid, [json_string("late")], T0 + 0.02)
    assert core.flush() == []


# ---------------------------------------------------------------- ends and accounting


def test_a_finished_task_reports_its_prompt_and_output_tokens() -> None:
    core = make_core()
    dispatch(core)
    rid = rid_of(core)
    core.usage(rid, 11)
    toks(core, "t1", 3, T0 + 0.005)
    core.finish(rid, "stop", T0 + 0.010)
    effects = core.take()
    (ended,) = sent(effects, p.TaskEnded)
    assert (ended.reason, ended.tokens_in, ended.tokens_out) == ("stop", 11, 3)
    assert round(ended.first_token_ms, 3) == 5.0 and round(ended.decode_ms, 3) == 10.0
    (art,) = sent(effects, p.PutArtifact)
    assert json.loads(art.doc)["content"]["tokens_out"] == 3
    assert not [e for e in effects if isinstance(e, AbortRequest)]  # the engine ended it
    payload = core.flush()[0][4]
    event, _, data = events(payload)[-1]
    assert (event, data["reason"], data["tokens_out"]) == ("end", "stop", 3)


def test_a_cancel_ends_the_stream_then_says_task_ended_then_abort_done() -> None:
    core = make_core()
    dispatch(core)
    rid = rid_of(core)
    core.usage(rid, 4)
    toks(core, "t1", 2, T0 + 0.01)
    core.on_message(p.Abort(9, "t1", "client"), T0 + 0.02)
    effects = core.take()
    assert AbortRequest(0, rid) in effects
    msgs = [e.msg for e in effects if isinstance(e, Send) and not isinstance(e.msg, p.PutArtifact)]
    assert [type(m) for m in msgs] == [p.TaskEnded, p.AbortDone]
    assert (msgs[0].reason, msgs[0].tokens_in, msgs[0].tokens_out) == ("canceled", 4, 2)
    assert msgs[1] == p.AbortDone(9, "t1")
    event, _, data = events(core.flush()[0][4])[-1]
    assert (event, data["reason"]) == ("end", "canceled")


def test_an_abort_of_an_unknown_task_is_answered() -> None:
    core = make_core()
    core.on_message(p.Abort(3, "ghost", "client"), T0)
    assert sent(core.take(), p.AbortDone) == [p.AbortDone(3, "ghost")]


def test_a_drain_abort_is_a_retriable_pool_unavailable_error() -> None:
    core = make_core()
    dispatch(core)
    core.on_message(p.Abort(4, "t1", "drained"), T0 + 0.01)
    (ended,) = sent(core.take(), p.TaskEnded)
    assert (ended.reason, ended.error_code) == ("error", "POOL_UNAVAILABLE")
    event, _, data = events(core.flush()[0][4])[-1]
    assert (event, data["code"], data["retriable"]) == ("error", "POOL_UNAVAILABLE", True)


def test_token_budget_ends_the_task_with_reason_budget() -> None:
    core = make_core()
    dispatch(core, tokens_budget=3)
    toks(core, "t1", 2, T0 + 0.01)
    assert "t1" in core.runs
    toks(core, "t1", 1, T0 + 0.02)
    effects = core.take()
    (ended,) = sent(effects, p.TaskEnded)
    assert (ended.reason, ended.tokens_out) == ("budget", 3)
    assert any(isinstance(e, AbortRequest) for e in effects)


# ---------------------------------------------------------------- the deadline heap


def test_decode_timeout_fails_a_silent_task() -> None:
    core = make_core(replica={"decode_timeout_ms": 500})
    dispatch(core)
    core.take()
    assert core.next_deadline() == T0 + 0.5
    core.tick(T0 + 0.499)
    assert "t1" in core.runs
    core.tick(T0 + 0.5)
    (ended,) = sent(core.take(), p.TaskEnded)
    assert ended.error_code == "DECODE_TIMEOUT"


def test_a_token_pushes_the_decode_timeout_back() -> None:
    core = make_core(replica={"decode_timeout_ms": 500})
    dispatch(core)
    toks(core, "t1", 1, T0 + 0.4)
    core.tick(T0 + 0.5)  # the old deadline: checked, rescheduled
    assert "t1" in core.runs
    assert core.next_deadline() == T0 + 0.9
    core.tick(T0 + 0.9)
    assert "t1" not in core.runs


def test_time_budget_ends_the_task_at_its_deadline() -> None:
    core = make_core()
    dispatch(core, time_budget_ms=200)
    core.tick(T0 + 0.2)
    (ended,) = sent(core.take(), p.TaskEnded)
    assert ended.reason == "budget"


def test_metrics_frames_go_to_fed_streams_only() -> None:
    core = make_core(scheduling={"metrics_interval_ms": 100})
    dispatch(core, "t1", slot=1, tokens_budget=50)
    dispatch(core, "t2", frontend=-1)
    core.flush()
    core.tick(T0 + 0.1)
    ((_, slot, _, _, payload),) = core.flush()
    ((event, _, data),) = events(payload)
    assert (slot, event, data["tokens_budget_remaining"]) == (1, "metrics", 50)
    assert [e for e, _, _ in events(b"".join(core.runs["t2"].transcript))] == ["started"]


def test_coalescing_holds_frames_until_n_tokens_or_the_interval() -> None:
    core = make_core(scheduling={"stream_interval_tokens": 4, "stream_interval_ms": 10})
    dispatch(core)
    core.flush()
    toks(core, "t1", 1, T0 + 0.001)
    assert len(core.flush()) == 1  # the first token: at once
    toks(core, "t1", 2, T0 + 0.002)
    assert core.flush() == []  # held
    toks(core, "t1", 2, T0 + 0.003)
    ((_, _, seq, _, payload),) = core.flush()  # 4 held: out together
    assert seq == 5 and len(events(payload)) == 4
    toks(core, "t1", 1, T0 + 0.004)
    assert core.flush() == []
    # (The check set for the earlier hold comes first: it finds nothing due and moves on.)
    core.tick(core.next_deadline())
    assert core.flush() == []
    assert core.next_deadline() == pytest.approx(T0 + 0.014)
    core.tick(core.next_deadline())  # the interval ran out
    ((_, _, seq, _, _),) = core.flush()
    assert seq == 6


def test_ended_transcripts_are_forgotten_after_retention() -> None:
    core = make_core(limits={"transcript_retention_ms": 1000})
    dispatch(core, frontend=-1)
    core.finish(rid_of(core), "stop", T0)
    keep = core.retention_s
    core.tick(T0 + keep - 0.001)
    assert "t1" in core.ended
    core.tick(T0 + keep)
    assert "t1" not in core.ended


def test_heartbeats_come_from_the_deadline_too() -> None:
    core = make_core(server={"heartbeat_ms": 2000})
    assert core.next_deadline() == T0 + 2.0
    core.tick(T0 + 2.0)
    assert sent(core.take(), p.Heartbeat) == [p.Heartbeat()]
    assert core.next_deadline() == T0 + 4.0


# ---------------------------------------------------------------- engines


def test_an_engine_death_fails_its_tasks_and_restarts_it_with_backoff() -> None:
    core = make_core()
    dispatch(core)
    core.engine_dead(0, "exit 9", T0 + 1)
    effects = core.take()
    (ended,) = sent(effects, p.TaskEnded)
    assert ended.error_code == "WORKER_RESET"
    (status,) = sent(effects, p.ReplicaStatus)
    assert (status.ready, status.last_error) == (False, "exit 9")
    (start,) = [e for e in effects if isinstance(e, StartEngine)]
    assert start.engine == 0 and start.delay_s > 0  # it died soon after its start
    # While it restarts, a dispatch fails at once, naming why.
    dispatch(core, "t2", T0 + 1.1)
    event, _, data = events(core.flush()[-1][4])[-1]
    assert (event, data["code"]) == ("error", "WORKER_RESET")
    assert "is restarting: exit 9" in data["message"]
    core.engine_ready(0, "mock-1.0", T0 + 2)
    assert sent(core.take(), p.ReplicaStatus)[0].ready


def test_failed_starts_open_the_circuit() -> None:
    core = make_core(ready=False)
    for _ in range(5):
        core.engine_start_failed(0, "no such model", T0)
    effects = core.take()
    assert "circuit open after 5 failures" in sent(effects, p.ReplicaStatus)[-1].last_error
    assert [e for e in effects if isinstance(e, StartEngine)][-1].delay_s == 30.0


def test_a_reload_switches_engines_and_the_old_one_stops_when_idle() -> None:
    core = make_core()
    dispatch(core, "old")
    core.on_message(p.ReloadPrepare(5, "mock:new"), T0)
    ((prep,),) = [[e for e in core.take() if isinstance(e, PrepareEngine)]]
    assert prep.model_ref == "mock:new" and prep.engine != 0
    core.prepared(5, prep.engine, True, "mock-2.0", "")
    assert sent(core.take(), p.ReloadReady) == [p.ReloadReady(5, True, "mock-2.0")]
    core.on_message(p.ReloadCommit(5), T0 + 1)
    effects = core.take()
    assert not [e for e in effects if isinstance(e, StopEngine)]  # "old" still runs there
    assert sent(effects, p.ReplicaStatus)[0].engine_version == "mock-2.0"
    assert core.replica.model_ref == "mock:new"
    (sub,) = [e for e in dispatch(core, "new", T0 + 2) if isinstance(e, Submit)]
    assert sub.engine == prep.engine
    core.finish(rid_of(core, "old"), "stop", T0 + 3)
    assert StopEngine(0) in core.take()


def test_a_failed_reload_keeps_the_serving_engine() -> None:
    core = make_core()
    core.on_message(p.ReloadPrepare(6, "mock:bad"), T0)
    (prep,) = [e for e in core.take() if isinstance(e, PrepareEngine)]
    core.prepared(6, prep.engine, False, "", "engine failed to start: boom")
    assert sent(core.take(), p.ReloadReady) == [
        p.ReloadReady(6, False, error="engine failed to start: boom")
    ]
    assert core.engines.current == 0 and prep.engine not in core.engines.engines


def test_a_retiring_engines_death_spares_the_serving_one() -> None:
    core = make_core()
    dispatch(core, "old")
    core.on_message(p.ReloadPrepare(7, "mock:new"), T0)
    (prep,) = [e for e in core.take() if isinstance(e, PrepareEngine)]
    core.prepared(7, prep.engine, True, "mock-2.0", "")
    core.on_message(p.ReloadCommit(7), T0)
    core.take()
    core.engine_dead(0, "exit 1", T0 + 1)
    effects = core.take()
    assert sent(effects, p.TaskEnded)[0].task_id == "old"
    assert not [e for e in effects if isinstance(e, StartEngine)]
    assert core.engines.ready


def test_full_rings_pause_reading_once_and_resume_once() -> None:
    core = make_core()
    core.rings_backed_up(True)
    core.rings_backed_up(True)
    core.rings_backed_up(False)
    core.rings_backed_up(False)
    assert core.take() == [PauseReading(True), PauseReading(False)]


def test_a_refusing_scheduler_stops_the_supervisor() -> None:
    core = make_core()
    core.on_message(p.Welcome(accepted=False, reason="protocol v9"), T0)
    assert any(type(e).__name__ == "Stop" for e in core.take())
