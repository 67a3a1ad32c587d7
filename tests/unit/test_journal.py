"""The durable journal: what its records mean (orchd/core/journal.py), how a restarted core takes
them over and what supervisors and frontends re-announce (orchd/core/recovery.py), event by
event with explicit time; then the file (orchd/scheduler/journal.py) on a real directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from ipc import protocol as p
from orchd.core import recovery
from orchd.core.journal import Admit, End, Record, SessionGone, SessionRec, Start, replay
from orchd.core.ownership import Stream
from orchd.core.scheduler import SchedulerCore, State
from orchd.core.sessions import Limits, SessionTable
from orchd.scheduler import journal as jfile
from tests.unit.test_scheduler_core import (
    FE,
    dispatched,
    ended,
    make_core,
    of,
    only,
    spec,
    sub,
    submit,
)

RETENTION = 60_000


def core_with_budgets(ready: bool = True) -> SchedulerCore:
    table = SessionTable(default=Limits(tokens=1000))
    return make_core(ready=ready, sessions=table, retention_ms=RETENTION)


def restart(old: SchedulerCore, now: float, *, adopt_ms: float = 5000) -> SchedulerCore:
    """A new core, its replicas not yet re-announced, from everything ``old`` journaled."""
    new = core_with_budgets(ready=False)
    recovery.restore(new, replay(recovery.take(old)), now, adopt_ms)
    return new


def ready(core: SchedulerCore, rid: str, now: float) -> list:
    return core.replica_status(f"sup-{rid}", p.ReplicaStatus(rid, True, "mock", "mock-1.0"), now)


# ---------------------------------------------------------------- replay, record by record


def test_replay_follows_each_task_from_admit_to_end() -> None:
    a, b = spec("a"), spec("b")
    state = replay([Admit(a, 1.0), Admit(b, 2.0)])
    assert [e.spec.task_id for e in state.live()] == ["a", "b"]
    state.apply(Start("a", "r0", 3.0))
    assert (state.tasks["a"].replica, state.tasks["a"].started_ms) == ("r0", 3.0)
    state.apply(End("a", "stop", 4.0))
    assert [e.spec.task_id for e in state.live()] == ["b"]
    assert state.tasks["a"].end == End("a", "stop", 4.0)  # kept: within retention a GET finds it
    state.apply(Start("a", "r1", 5.0))  # nothing starts after its end
    assert state.tasks["a"].replica == "r0"
    state.apply(Start("zz", "r0", 6.0))  # a record for a task the journal never admitted
    assert "zz" not in state.tasks


def test_a_task_id_admitted_again_is_the_newer_task_in_its_place() -> None:
    state = replay([Admit(spec("a"), 1.0), End("a", "stop", 2.0), Admit(spec("b"), 3.0)])
    state.apply(Admit(spec("a"), 4.0))
    assert [e.spec.task_id for e in state.live()] == ["b", "a"]
    assert state.tasks["a"].end is None and state.tasks["a"].admitted_ms == 4.0


def test_sessions_replay_to_their_latest_record() -> None:
    rec = SessionRec("s1", "k", 1.0, 2.0, 600_000, 100, None, None, turns=1)
    state = replay([rec, SessionRec("s2", "k", 1.0, 1.0, 600_000, 5, None, None)])
    state.apply(SessionRec("s1", "k", 1.0, 9.0, 600_000, 40, None, None, turns=2))
    state.apply(SessionGone("s2"))
    assert list(state.sessions) == ["s1"]
    assert (state.sessions["s1"].tokens_left, state.sessions["s1"].turns) == (40, 2)


def test_take_hands_each_record_over_once() -> None:
    core = core_with_budgets()
    submit(core, "t1", 0)
    recs = recovery.take(core)
    kinds = [type(r).__name__ for r in recs]
    assert kinds == ["Admit", "Start", "SessionRec"]
    assert recovery.take(core) == []
    ended(core, "t1", 10, tokens_out=5)
    assert [type(r).__name__ for r in recovery.take(core)] == ["End", "SessionRec"]


# ---------------------------------------------------------------- a restarted core


def test_queued_tasks_come_back_queued_in_their_order() -> None:
    old = core_with_budgets()
    for i in range(6):
        submit(old, f"t{i}", i)  # t0..t3 fill the four slots, t4 and t5 wait
    new = restart(old, 100)
    assert [t for t, st in ((k, v.state) for k, v in new.tasks.items())] == [
        f"t{i}" for i in range(6)
    ]
    assert new.tasks["t4"].state is State.QUEUED and new.queue_depth() == 2
    assert new.adopting == {"t0": "r0", "t1": "r1", "t2": "r0", "t3": "r1"}
    # Nothing is dispatched until the replicas have said what they run.
    assert dispatched(new.dispatch(101)) == []


def test_a_supervisors_running_tasks_are_adopted_not_dispatched_again() -> None:
    old = core_with_budgets()
    for i in range(6):
        submit(old, f"t{i}", i)
    new = restart(old, 100)
    held = [p.RunningTask("t0", 0, 7, "attached", tokens=12), p.RunningTask("t2", -1, 0, "none")]
    assert recovery.running(new, "sup-r0", p.Running("r0", held), 101) == []
    assert new.replicas["r0"].active == {"t0", "t2"}
    t0 = new.tasks["t0"]
    assert (t0.state, t0.frontend, t0.slot, t0.stream) == (State.RUNNING, 0, 7, Stream.ATTACHED)
    assert dispatched(ready(new, "r0", 102)) == []  # r0 is full: nothing placed twice
    # r1's supervisor is a new process: what ran there is lost, retriably.
    out = recovery.running(new, "sup-r1", p.Running("r1", []), 103)
    assert new.tasks["t1"].error is not None and new.tasks["t1"].error.code == "WORKER_RESET"
    assert new.tasks["t3"].state is State.ENDED and not new.adopting
    assert out == []  # nobody streamed them: a GET finds the error
    assert dispatched(ready(new, "r1", 104)) == [("sup-r1", "t4"), ("sup-r1", "t5")]
    # A task adopted ends as any other.
    ended(new, "t0", 200, tokens_out=16)
    assert new.tasks["t0"].state is State.ENDED and new.replicas["r0"].active == {"t2"}


def test_a_task_that_ended_while_no_scheduler_listened_is_ended_and_replayable() -> None:
    old = core_with_budgets()
    submit(old, "t0", 0)
    new = restart(old, 100)
    gone = p.RunningTask("t0", -1, 0, "none", tokens=16, tokens_in=3, ended=True, reason="stop")
    recovery.running(new, "sup-r0", p.Running("r0", [gone]), 101)
    t = new.tasks["t0"]
    assert (t.state, t.end_reason, t.replayable) == (State.ENDED, "stop", True)
    out = sub(new, "t0", slot=3, now=102)  # the client's GET replays its transcript
    assert only(out, p.Attach) == ("sup-r0", p.Attach("t0", 0, 3))
    # Its session was charged what it used (16 out + 3 in) and its reservation released.
    s = new.sessions.sessions["s-t0"]
    assert (s.tokens_left, s.reserved_tokens, s.active) == (1000 - 19, 0, 0)


def test_started_tasks_nobody_reannounces_end_when_the_wait_is_over() -> None:
    old = core_with_budgets()
    submit(old, "t0", 0)
    new = restart(old, 100, adopt_ms=5000)
    assert recovery.overdue(new, 5099) == []
    recovery.overdue(new, 5100)
    err = new.tasks["t0"].error
    assert err is not None and err.code == "WORKER_RESET" and err.retry_after_ms == 1000


def test_a_frontend_reannounces_who_streams_each_task() -> None:
    old = core_with_budgets()
    for i in range(6):
        submit(old, f"t{i}", i)
    new = restart(old, 100)
    held = [
        p.HeldStream("t4", 11, claimed=True),  # a client waits on a queued task
        p.HeldStream("t5", 12, claimed=False),  # a provisional stream from its admission
        p.HeldStream("t0", 13, claimed=True),  # a running one, supervisor not heard yet
        p.HeldStream("nope", 14, claimed=True),  # a task the journal does not know
    ]
    out = recovery.streams(new, FE, p.Streams(held), 101)
    ((peer, fail),) = of(out, p.StreamFail)
    assert (peer, fail.slot, fail.task_id, fail.error.code) == (FE, 14, "nope", "WORKER_RESET")
    assert (new.tasks["t4"].stream, new.tasks["t4"].slot) == (Stream.SUBSCRIBED, 11)
    assert new.tasks["t5"].stream is Stream.PROVISIONAL
    # The supervisor then says it fed t0 provisionally: the claim it missed is passed on.
    sup = [p.RunningTask("t0", 0, 13, "provisional"), p.RunningTask("t2", -1, 0, "none")]
    out = recovery.running(new, "sup-r0", p.Running("r0", sup), 102)
    assert out == [("sup-r0", p.Claim("t0"))]
    assert new.tasks["t0"].stream is Stream.ATTACHED
    # When t4 runs, its dispatch feeds the re-announced stream.
    recovery.running(new, "sup-r1", p.Running("r1", []), 103)
    d4, d5 = [m for _, m in ready(new, "r1", 104) if isinstance(m, p.Dispatch)]
    assert (d4.task.task_id, d4.frontend, d4.slot) == ("t4", 0, 11)
    assert (d5.task.task_id, d5.frontend, d5.slot, d5.provisional) == ("t5", 0, 12, True)


def test_sessions_turns_and_budgets_survive() -> None:
    old = core_with_budgets()
    submit(old, "t0", 0)
    ended(old, "t0", 50, tokens_out=100)
    submit(old, "t1", 60)  # its reservation is held across the restart
    before = old.sessions.sessions["s-t0"]
    new = restart(old, 100)
    after = new.sessions.sessions["s-t0"]
    assert (after.turns, after.tokens_left, after.owner) == (1, 900, before.owner)
    assert after.last_used_ms == pytest.approx(before.last_used_ms)
    s1 = new.sessions.sessions["s-t1"]
    assert (s1.reserved_tokens, s1.active) == (16, 1)
    assert new.tasks["t1"].grant is not None  # ... and released or charged at its end
    recovery.running(new, "sup-r0", p.Running("r0", []), 101)
    recovery.running(new, "sup-r1", p.Running("r1", []), 101)
    assert (s1.reserved_tokens, s1.active, s1.turns) == (0, 0, 1)


def test_ended_tasks_are_kept_for_their_retention_only() -> None:
    old = core_with_budgets()
    submit(old, "t0", 0)
    submit(old, "t1", 0)
    ended(old, "t0", 10)
    ended(old, "t1", 5000)
    new = restart(old, RETENTION + 10)
    assert "t0" not in new.tasks  # its retention had passed: forgotten, as without a restart
    assert new.tasks["t1"].state is State.ENDED and new.tasks["t1"].end_reason == "stop"


def test_snapshot_replays_to_the_same_state() -> None:
    old = core_with_budgets()
    for i in range(6):
        submit(old, f"t{i}", i)
    ended(old, "t0", 10)
    recovery.take(old)
    new = core_with_budgets(ready=False)
    recovery.restore(new, replay(recovery.snapshot(old)), 20, 5000)
    assert {k: v.state for k, v in new.tasks.items()} == {k: v.state for k, v in old.tasks.items()}
    assert new.sessions.sessions.keys() == old.sessions.sessions.keys()


def test_wall_clock_times_carry_across_a_change_of_monotonic_clock() -> None:
    old = core_with_budgets()
    old.wall_offset_ms = 1_000_000.0
    submit(old, "t0", 5)
    new = core_with_budgets(ready=False)
    new.wall_offset_ms = 999_000.0  # e.g. after a reboot: the same wall time reads 1000 later
    recovery.restore(new, replay(recovery.take(old)), 2000, 5000)
    assert new.tasks["t0"].enqueued_ms == 1005.0


# ---------------------------------------------------------------- the file


def records() -> list[Record]:
    return [Admit(spec("a"), 1.0), Start("a", "r0", 2.0), Admit(spec("b"), 3.0)]


def test_the_file_round_trips_and_cuts_a_torn_tail(tmp_path: Path) -> None:
    f = jfile.JournalFile(str(tmp_path))
    f.compact([])
    f.append(records())
    f.append([End("a", "stop", 4.0)])
    f.close()
    path = tmp_path / "journal.bin"
    data = path.read_bytes()
    assert jfile.parse(data)[0] == [*records(), End("a", "stop", 4.0)]
    path.write_bytes(data[:-3])  # a crash mid-write
    f = jfile.JournalFile(str(tmp_path))
    assert f.read() == records()
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF  # a corrupt last record
    assert jfile.parse(bytes(flipped))[0] == records()
    f.close()


def test_a_second_orchd_may_not_share_the_state_dir(tmp_path: Path) -> None:
    first = jfile.JournalFile(str(tmp_path))
    with pytest.raises(jfile.JournalError, match="in use by another orchd"):
        jfile.JournalFile(str(tmp_path))
    first.close()
    jfile.JournalFile(str(tmp_path)).close()  # free again once the first is gone


def test_the_journal_compacts_past_its_bound(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jfile, "COMPACT_MIN_BYTES", 4096)
    core = core_with_budgets()
    j = jfile.Journal(core, str(tmp_path), 0, 5000)
    sizes = []
    for i in range(200):
        submit(core, f"t{i}", i)
        ended(core, f"t{i}", i + 0.5)
        j.commit(i)
        j.sync(i)
        sizes.append(os.path.getsize(tmp_path / "journal.bin"))
    bound = max(4096, jfile.COMPACT_GROWTH * j.file.base) + 2048  # + one turn's records
    assert max(sizes) <= bound
    assert min(sizes[50:]) < max(sizes)  # it shrank at least once
    j.close()
    again = core_with_budgets(ready=False)
    jfile.Journal(again, str(tmp_path), 300, 5000).close()
    assert set(again.tasks) == set(core.tasks)  # all within retention, nothing else


def test_a_202_waits_for_the_fsync_other_records_only_for_the_lazy_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = core_with_budgets()
    j = jfile.Journal(core, str(tmp_path), 0, 5000)
    syncs: list[int] = []
    monkeypatch.setattr(j.file, "sync", lambda: syncs.append(1))
    submit(core, "t0", 0)  # an admission: fsynced before its 202
    j.commit(10.0)
    j.sync(10.0)
    assert len(syncs) == 1
    ended(core, "t0", 1)  # an end: written at once, fsynced within LAZY_SYNC_S
    assert j.commit(11.0) > 0
    j.sync(11.0 + jfile.LAZY_SYNC_S - 0.01)
    assert len(syncs) == 1
    j.sync(11.0 + jfile.LAZY_SYNC_S)
    assert len(syncs) == 2
    j.sync(20.0)  # nothing unsynced: no fsync
    assert len(syncs) == 2
    # Written records survive this process at once (they are in the kernel's page cache).
    assert [type(r).__name__ for r in jfile.JournalFile.read(j.file)][-2:] == ["End", "SessionRec"]
    j.file.close()
