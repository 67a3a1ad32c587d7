"""Peer liveness in the scheduler (orchd/core/liveness.py), event by event: judged on the
scheduler's waking time, and a peer taken as dead is taken back on its next message."""

from __future__ import annotations

from orchd.core.liveness import Heard, PeerClock


def clock() -> PeerClock:
    c = PeerClock(timeout_ms=10_000, stall_ms=2_000, now=0.0)
    c.hello("sup-r0", 101, 0.0)
    c.hello("fe0", 102, 0.0)
    return c


def test_a_peer_silent_past_the_timeout_is_named() -> None:
    c = clock()
    for t in range(0, 12_000, 250):  # the loop turns every 250 ms
        c.woke(float(t))
        c.heard("fe0", float(t))
    assert c.silent(10_000.0) == []
    assert c.silent(10_250.0) == ["sup-r0"]


def test_a_paused_scheduler_judges_nobody_on_its_own_pause() -> None:
    """Issue 12, failure 1: resumed after 15 s, the scheduler ran its timer before it read the
    heartbeats queued meanwhile, and took every peer as dead."""
    c = clock()
    c.woke(1_000.0)
    c.heard("sup-r0", 1_000.0)
    c.heard("fe0", 1_000.0)
    assert c.woke(16_000.0) == 15_000.0  # SIGSTOP for 15 s, then SIGCONT
    assert c.stalls == 1
    assert c.silent(16_000.0) == []  # before reading anything: nobody is judged yet
    # The queued heartbeats are still arriving; each peer keeps its full timeout from here.
    assert c.silent(16_000.0 + 9_000) == []
    assert c.ages(16_000.0) == {"sup-r0": 0, "fe0": 0}


def test_an_ordinary_loop_gap_is_not_a_stall() -> None:
    c = clock()
    assert c.woke(1_000.0) == 0.0
    assert c.woke(3_000.0) == 0.0  # exactly the stall threshold
    assert c.stalls == 0


def test_a_peer_taken_as_dead_is_asked_once_then_taken_back_by_its_hello() -> None:
    c = clock()
    c.down("sup-r0")
    assert c.heard("sup-r0", 20_000.0) is Heard.ASK
    assert c.heard("sup-r0", 20_100.0) is Heard.ASKED  # asked already: no second Rehello
    assert c.hello("sup-r0", 101, 20_200.0) is False  # the same process, back
    assert "sup-r0" in c.known
    assert c.heard("sup-r0", 20_300.0) is Heard.KNOWN


def test_a_new_scheduler_asks_every_peer_it_never_met() -> None:
    c = PeerClock(timeout_ms=10_000, stall_ms=2_000, now=0.0)
    assert c.heard("fe0", 5.0) is Heard.ASK
    assert c.hello("fe0", 7, 6.0) is False  # new to us: not a restart


def test_another_pid_is_a_new_incarnation() -> None:
    c = clock()
    assert c.hello("sup-r0", 999, 1_000.0) is True
    assert c.hello("sup-r0", 999, 2_000.0) is False


def test_the_launcher_is_exempt() -> None:
    c = clock()
    c.hello("launcher", 1, 0.0)
    assert c.silent(60_000.0, frozenset({"launcher"})) == ["fe0", "sup-r0"]
