"""Resumable streams in the sans-IO cores, event by event: the scheduler's grace period for a
detached stream (orchd/core/streams.py), the take-over by a GET with Last-Event-ID, 409 for a
second GET without it, and the supervisor's replay from an event id (engine_procs)."""

from __future__ import annotations

from engine_procs.runs import abort_error
from ipc import openai_frames as oa
from ipc import protocol as p
from ipc.frames import KIND_DATA, KIND_TERMINAL, end_frame, frame, frames_after, token_frame
from orchd.config import Replica
from orchd.core.ownership import Stream
from orchd.core.scheduler import SchedulerCore, State
from tests.unit.test_scheduler_core import fill, make_core, of, only, sub, submit
from tests.unit.test_supervisor_core import T0, events, rid_of, toks
from tests.unit.test_supervisor_core import dispatch as sup_dispatch
from tests.unit.test_supervisor_core import make_core as make_sup

GRACE = 10_000


def sub_after(
    core: SchedulerCore, tid: str, slot: int, frontend: int, after: int, now: float = 0
) -> list:
    return core.subscribe(f"fe{frontend}", p.Subscribe(900, tid, frontend, slot, after), now)


# ---------------------------------------------------------------- the scheduler's rules


def test_a_client_that_leaves_detaches_its_stream_and_the_task_runs_on_for_the_grace() -> None:
    core = make_core(resume_grace_ms=GRACE)
    submit(core, "t1")
    sub(core, "t1", slot=3)
    out = core.unsubscribe("fe0", p.Unsubscribe("t1", 3), 100)
    assert out == [("sup-r0", p.Detach("t1"))]  # its supervisor stops feeding the stream
    t = core.tasks["t1"]
    assert t.stream is Stream.DETACHED and (t.frontend, t.slot) == (-1, 0)
    assert core.tick(100 + GRACE - 1) == []
    assert t.state is State.RUNNING
    ((peer, ab),) = of(core.tick(100 + GRACE), p.Abort)  # no GET came: canceled
    assert (peer, ab.task_id, ab.reason) == ("sup-r0", "t1", "client_disconnect")
    assert t.stream is Stream.NONE


def test_a_resume_within_the_grace_reattaches_from_the_next_event_on_any_frontend() -> None:
    core = make_core(resume_grace_ms=GRACE)
    submit(core, "t1")
    sub(core, "t1", slot=3)
    core.unsubscribe("fe0", p.Unsubscribe("t1", 3), 100)
    out = sub_after(core, "t1", slot=8, frontend=1, after=17, now=200)
    assert ("fe1", p.Subscribed(900, "t1")) in out
    assert ("sup-r0", p.Attach("t1", 1, 8, 17)) in out
    assert core.tasks["t1"].stream is Stream.ATTACHED
    assert of(core.tick(100 + GRACE + 1), p.Abort) == []  # the grace is over: it is resumed


def test_a_resume_while_another_connection_holds_it_takes_it_over() -> None:
    core = make_core()
    submit(core, "t1")
    sub(core, "t1", slot=3)
    out = sub_after(core, "t1", slot=5, frontend=1, after=4)
    assert out[0] == ("fe0", p.Release("t1", 3))  # the old connection ends
    assert ("sup-r0", p.Attach("t1", 1, 5, 4)) in out
    assert (core.tasks["t1"].frontend, core.tasks["t1"].slot) == (1, 5)
    # The old connection's goodbye, arriving late, lets nothing go.
    assert core.unsubscribe("fe0", p.Unsubscribe("t1", 3), 1) == []
    assert core.tasks["t1"].stream is Stream.ATTACHED


def test_a_second_get_without_last_event_id_is_409_with_it_a_take_over() -> None:
    core = make_core()
    submit(core, "t1")
    sub(core, "t1", slot=3)
    ((_, f),) = sub(core, "t1", slot=4, frontend=1)
    assert isinstance(f, p.Failed) and f.error.code == "STREAM_CONFLICT"
    out = sub_after(core, "t1", slot=4, frontend=1, after=0, now=12)
    assert ("sup-r0", p.Attach("t1", 1, 4, 0)) in out


def test_an_ended_tasks_stream_reopened_without_last_event_id_replays_whole() -> None:
    """`curl .../stream` twice: the second, after the end, is the whole stream again, not a
    409 (nothing live is left to contest, even if the first connection still writes)."""
    core = make_core()
    submit(core, "t1")
    sub(core, "t1", slot=3)
    core.task_ended("sup-r0", p.TaskEnded("t1", "stop", 3), 10)
    assert core.tasks["t1"].stream is Stream.TERMINAL_PENDING
    out = sub(core, "t1", slot=4, frontend=1, now=11)
    assert not of(out, p.Failed)
    assert ("sup-r0", p.Attach("t1", 1, 4, -1)) in out  # from the first event


def test_an_ended_task_resumes_from_the_supervisors_transcript() -> None:
    core = make_core()
    submit(core, "t1")
    sub(core, "t1", slot=3)
    core.unsubscribe("fe0", p.Unsubscribe("t1", 3), 1)
    core.task_ended("sup-r0", p.TaskEnded("t1", "stop", 3), 2)
    assert core.tasks["t1"].stream is Stream.DETACHED
    assert of(core.tick(2 + GRACE), p.Abort) == []  # ended: nothing to cancel
    out = sub_after(core, "t1", slot=9, frontend=1, after=2, now=3 + GRACE)
    assert ("sup-r0", p.Attach("t1", 1, 9, 2)) in out
    assert core.tasks["t1"].stream is Stream.TERMINAL_PENDING


def test_a_lost_frontends_queued_stream_fails_retriably_after_the_grace_not_canceled() -> None:
    grace = 5_000  # under the task's deadline_ms (10 s): the grace, not the deadline, ends it
    core = make_core(resume_grace_ms=grace)
    fill(core)
    submit(core, "q1")
    sub(core, "q1", slot=3)
    out = core.peer_down("fe0", "heartbeat timeout", 10)
    (_, sf) = only(out, p.StreamFail)
    assert sf.error.code == "STREAM_INTERRUPTED"
    assert core.tasks["q1"].state is State.QUEUED  # still waiting: a client may resume
    core.tick(10 + grace)
    t = core.tasks["q1"]
    assert t.state is State.ENDED and t.end_reason != "canceled"
    assert t.error is not None and t.error.code == "STREAM_INTERRUPTED"


def test_a_detached_queued_stream_is_fed_from_dispatch_once_resumed() -> None:
    core = make_core(resume_grace_ms=GRACE)
    fill(core)
    submit(core, "q1")
    sub(core, "q1", slot=3)
    core.unsubscribe("fe0", p.Unsubscribe("q1", 3), 5)
    out = sub_after(core, "q1", slot=4, frontend=1, after=0, now=6)
    assert of(out, p.Attach) == []  # queued: the dispatch names its new frontend
    assert core.tasks["q1"].stream is Stream.SUBSCRIBED
    out = core.task_ended("sup-r0", p.TaskEnded("t1", "stop", 1), 7)
    (_, d) = only(out, p.Dispatch)
    assert (d.task.task_id, d.frontend, d.slot) == ("q1", 1, 4)


# ---------------------------------------------------------------- the supervisor's rules


def test_the_supervisor_replays_exactly_the_events_after_last_event_id() -> None:
    core = make_sup()
    sup_dispatch(core)
    toks(core, "t1", 5, T0 + 0.01)
    core.flush()
    core.on_message(p.Detach("t1"), T0 + 0.02)  # the client left
    assert core.runs["t1"].stream is Stream.DETACHED
    toks(core, "t1", 2, T0 + 0.03)  # made while nobody reads: only the transcript has them
    assert core.flush() == []
    core.on_message(p.Attach("t1", 1, 9, 3), T0 + 0.04)
    ((fe, slot, _, kind, payload),) = core.flush()
    assert (fe, slot, kind) == (1, 9, KIND_DATA)
    assert [i for _, i, _ in events(payload)] == [4, 5, 6, 7]
    core.finish(rid_of(core), "stop", T0 + 0.05)
    ((_, _, _, kind, payload),) = core.flush()
    assert kind == KIND_TERMINAL and [e for e, _, _ in events(payload)] == ["end"]
    # Ended and delivered, the transcript is still kept: a second resume replays from 6.
    core.on_message(p.Attach("t1", 0, 2, 6), T0 + 0.06)
    ((_, _, _, kind, payload),) = core.flush()
    assert kind == KIND_TERMINAL
    assert [(e, i) for e, i, _ in events(payload)] == [("token", 7), ("end", 8)]


def test_a_resume_after_the_terminal_gets_the_terminal_again_never_an_empty_stream() -> None:
    core = make_sup()
    sup_dispatch(core, frontend=-1)
    toks(core, "t1", 2, T0)
    core.finish(rid_of(core), "stop", T0 + 0.01)
    core.on_message(p.Attach("t1", 0, 4, 3), T0 + 0.02)  # 3 is the end's id
    ((_, _, _, kind, payload),) = core.flush()
    assert kind == KIND_TERMINAL and [(e, i) for e, i, _ in events(payload)] == [("end", 3)]


def test_a_resume_after_the_transcript_is_gone_ends_with_one_clear_error() -> None:
    core = make_sup(limits={"transcript_retention_ms": 1000})
    sup_dispatch(core, frontend=-1)
    core.finish(rid_of(core), "stop", T0)
    core.tick(T0 + core.retention_s)
    core.on_message(p.Attach("t1", 0, 4, 7), T0 + core.retention_s)
    ((_, slot, _, kind, payload),) = core.flush()
    assert (slot, kind) == (4, KIND_TERMINAL)
    ((event, seq, data),) = events(payload)
    assert (event, seq, data["code"]) == ("error", 8, "INTERNAL")
    assert "transcript" in data["message"]


def test_abort_reasons_map_to_their_terminal() -> None:
    r = Replica("r0")
    err = abort_error("frontend_lost", r)
    assert err is not None and err.code == "STREAM_INTERRUPTED" and err.retriable
    assert abort_error("client_disconnect", r) is None  # end canceled: the client left
    assert abort_error("client", r) is None


# ---------------------------------------------------------------- the replay filter


def test_frames_after_keeps_ids_and_the_done_line() -> None:
    native = [
        frame("started", 0, {}),
        token_frame(1, 0, b'"a\\n\\nb"') + token_frame(2, 1, b'"id: 9"'),
        end_frame(3, 2, 1.0, 1.0, "stop"),
    ]
    assert frames_after(native, -1) == b"".join(native)
    assert (
        frames_after(native, 1)
        == b"".join(native)[len(native[0]) + len(token_frame(1, 0, b'"a\\n\\nb"')) :]
    )
    assert frames_after(native, 3) == b""
    chunks = [oa.data_frame(0, b"{}"), oa.data_frame(1, b"{}") + oa.data_frame(2, b"{}") + oa.DONE]
    assert frames_after(chunks, 1) == oa.data_frame(2, b"{}") + oa.DONE
