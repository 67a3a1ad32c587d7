"""The launcher's watchdog rule (orchd/core/watchdog.py), event by event."""

from __future__ import annotations

import pytest

from orchd.core.watchdog import START_LIMIT_S, Watchdog

LEAD = "scheduler"


def dog(limit_s: float = 10.0) -> Watchdog:
    w = Watchdog(LEAD, limit_s, heartbeat_s=1.0)
    for name in (LEAD, "sup-r0", "fe0"):
        w.started(name, 0.0)
    return w


def names(w: Watchdog, now: float) -> list[str]:
    return [o.name for o in w.overdue(now)]


def test_children_heard_through_the_leader_are_never_overdue() -> None:
    w = dog()
    for t in range(1, 60):
        w.report({"sup-r0": 500, "fe0": 900}, float(t))
        assert names(w, float(t)) == []


def test_a_child_the_leader_stopped_hearing_is_overdue_after_the_limit() -> None:
    w = dog()
    for t in range(1, 12):
        # sup-r0 was last heard at t = 1 (its age grows); fe0 keeps talking.
        w.report({"sup-r0": (t - 1) * 1000, "fe0": 100}, float(t))
    assert names(w, 11.0) == []  # 10 s silent: not past the limit yet
    w.report({"sup-r0": 11_000, "fe0": 100}, 12.0)
    (late,) = w.overdue(12.0)
    assert late.name == "sup-r0" and late.silent_s == pytest.approx(11.0)
    assert late.reason == "watchdog: alive but no heartbeat for 11.0s"


def test_a_child_that_never_says_a_word_is_overdue_after_the_start_limit() -> None:
    w = dog()
    w.report({"fe0": 0}, 10.5)  # the leader never heard sup-r0: it may still be starting
    assert names(w, 10.5) == []
    w.report({"fe0": 0}, START_LIMIT_S + 0.5)
    assert names(w, START_LIMIT_S + 0.5) == ["sup-r0"]


def test_once_heard_a_child_has_the_plain_limit() -> None:
    w = dog()
    w.report({"sup-r0": 0, "fe0": 0}, 1.0)  # heard at 1.0
    w.report({"sup-r0": 10_500, "fe0": 0}, 11.5)
    assert names(w, 11.5) == ["sup-r0"]


def test_a_silent_leader_is_killed_and_nobody_is_judged_on_its_stale_word() -> None:
    w = dog()
    w.report({"sup-r0": 0, "fe0": 0}, 1.0)
    assert names(w, 10.9) == []
    assert names(w, 11.1) == [LEAD]  # only the leader: the others' word came from it


def test_a_restarted_child_gets_the_start_limit_again() -> None:
    w = dog()
    w.report({"sup-r0": 0, "fe0": 0}, 1.0)
    w.exited("sup-r0")
    w.started("sup-r0", 20.0)
    # The leader still reports the old incarnation's age: the new one is judged from its start.
    w.report({"sup-r0": 19_000, "fe0": 0}, 20.0)
    w.report({"sup-r0": 31_000, "fe0": 0}, 32.0)
    assert names(w, 32.0) == []  # still starting
    w.report({"sup-r0": 0, "fe0": 0}, 33.0)  # heard: now the plain limit applies
    w.report({"sup-r0": 10_500, "fe0": 0}, 43.5)
    assert names(w, 43.5) == ["sup-r0"]


def test_an_exited_child_is_not_judged() -> None:
    w = dog()
    w.exited("sup-r0")
    w.report({"fe0": 0}, 30.0)
    assert names(w, 30.0) == []


def test_the_limit_must_cover_two_reports() -> None:
    with pytest.raises(ValueError, match="watchdog_ms"):
        Watchdog(LEAD, 5.0, heartbeat_s=3.0)
    with pytest.raises(ValueError, match="watchdog_ms"):
        Watchdog(LEAD, 1.5, heartbeat_s=0.2)  # an idle scheduler reports once a second
    Watchdog(LEAD, 2.0, heartbeat_s=0.2)
