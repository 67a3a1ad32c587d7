"""The launcher's restart decisions (orchd/core/restart.py RestartGroup), event by event with
explicit times; then the launcher's wiring of them, with fake processes and a fake clock."""

from __future__ import annotations

import signal
from typing import Any

import pytest

from ipc import protocol as p
from orchd import launcher as launcher_mod
from orchd.config import Config
from orchd.core.restart import RestartGroup, RestartPolicy
from orchd.launcher import LEADER, Launcher

NAMES = ["scheduler", "sup-r0", "fe0"]


def group(now: float = 0.0, **kw: Any) -> RestartGroup:
    kw.setdefault("threshold", 3)
    kw.setdefault("cooldown_s", 30.0)
    kw.setdefault("stable_after_s", 10.0)
    return RestartGroup(NAMES, "scheduler", lambda: RestartPolicy(0.25, 1.0, **kw), now)


def start_all(g: RestartGroup, now: float) -> None:
    names = g.due(now)
    assert names == NAMES  # the scheduler first, then in the order given
    for n in names:
        g.started(n, now)
    assert g.due(now) == [] and g.next_due() is None


# ---------------------------------------------------------------- the pure rule


def test_a_new_group_starts_everyone_now_scheduler_first() -> None:
    g = RestartGroup(["fe0", "sup-r0", "scheduler"], "scheduler", lambda: RestartPolicy(1, 2), 5.0)
    assert g.next_due() == 5.0
    assert g.due(4.9) == []
    assert g.due(5.0) == ["scheduler", "fe0", "sup-r0"]


def test_the_leader_must_be_a_child() -> None:
    with pytest.raises(ValueError, match="leader"):
        RestartGroup(["fe0"], "scheduler", lambda: RestartPolicy(1, 2), 0.0)


def test_a_quick_death_backs_off_doubling_to_the_cap_then_the_breaker_opens() -> None:
    g = group(threshold=5)
    start_all(g, 0.0)
    now, delays = 0.0, []
    for _ in range(5):
        now += 1.0  # each run lasts 1 s: well short of stable
        assert g.exited("fe0", now) == []
        at = g.children["fe0"].restart_at
        assert at is not None
        delays.append(round(at - now, 3))
        assert g.due(at - 0.001) == []
        assert g.next_due() == at
        assert g.due(at) == ["fe0"]
        g.started("fe0", at)
        now = at
    assert delays == [0.25, 0.5, 1.0, 1.0, 30.0]  # base 0.25 doubling to the 1.0 cap; breaker
    assert g.children["fe0"].policy.open


def test_a_child_that_ran_stable_restarts_at_once() -> None:
    g = group()
    start_all(g, 0.0)
    g.exited("sup-r0", 1.0)  # a quick death first: one failure
    assert g.children["sup-r0"].restart_at == 1.25
    g.started("sup-r0", 1.25)
    assert g.exited("sup-r0", 11.25) == []  # served 10 s: healthy, and the failures are forgiven
    assert g.children["sup-r0"].restart_at == 11.25
    assert g.due(11.25) == ["sup-r0"]
    assert g.children["sup-r0"].policy.failures == 0


def test_each_child_has_its_own_backoff() -> None:
    g = group()
    start_all(g, 0.0)
    g.exited("fe0", 1.0)
    g.started("fe0", 1.25)
    g.exited("fe0", 2.0)  # fe0's second quick death: 0.5 s
    g.exited("sup-r0", 2.0)  # sup-r0's first: 0.25 s
    assert g.due(2.25) == ["sup-r0"]
    assert g.next_due() == 2.25
    g.started("sup-r0", 2.25)
    assert g.next_due() == 2.5
    assert g.due(2.5) == ["fe0"]


def test_the_schedulers_death_leaves_the_others_running() -> None:
    # A restarted scheduler rebuilds from its journal and the others' re-announcements.
    g = group()
    start_all(g, 0.0)
    assert g.exited("scheduler", 1.0) == []  # the launcher kills nobody
    assert [n for n, c in g.children.items() if c.running] == ["sup-r0", "fe0"]
    assert g.children["scheduler"].restart_at == 1.25
    assert g.due(1.2) == []
    assert g.due(1.25) == ["scheduler"]
    assert g.children["fe0"].policy.failures == 0
    assert g.children["scheduler"].policy.failures == 1


def test_no_child_starts_while_the_scheduler_is_down() -> None:
    g = group()
    start_all(g, 0.0)
    g.exited("fe0", 1.0)  # fe0 due at 1.25
    assert g.exited("scheduler", 1.5) == []  # due at 1.75; sup-r0 runs on
    assert g.next_due() == 1.75  # not fe0's 1.25: it waits for the scheduler
    assert g.due(1.5) == []
    assert g.due(1.75) == ["scheduler", "fe0"]


def test_a_start_that_failed_is_retried_with_backoff() -> None:
    g = group()
    start_all(g, 0.0)
    g.exited("fe0", 20.0)  # stable: due at once
    assert g.exited("scheduler", 20.0) == []  # stable: due at once
    assert g.due(20.0) == ["scheduler", "fe0"]
    g.start_failed("scheduler", 20.0)  # e.g. fork failed
    assert g.children["scheduler"].restart_at == 20.25
    assert g.due(20.0) == []  # and fe0 waits for it
    assert g.next_due() == 20.25
    assert g.due(20.25) == ["scheduler", "fe0"]


# ---------------------------------------------------------------- the launcher's wiring


class FakeProc:
    """A child process that exits when the test says so, or when signalled."""

    pids = iter(range(1000, 10**6))

    def __init__(self, argv: list[str], **kw: Any) -> None:
        self.argv = argv
        self.pid = next(self.pids)
        self.returncode: int | None = None
        self.signals: list[int] = []

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.returncode = -sig

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class FakeSock:
    def __init__(self) -> None:
        self.sent: list[p.Message] = []

    def send(self, data: bytes) -> None:
        self.sent.append(p.decode(data))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> tuple[Launcher, Clock, FakeSock]:
    clock = Clock()
    monkeypatch.setattr(launcher_mod.time, "monotonic", clock.monotonic)
    monkeypatch.setattr(launcher_mod.subprocess, "Popen", FakeProc)
    cfg = Config()
    cfg.server.restart_backoff_ms = 250
    cfg.server.restart_backoff_max_ms = 1000
    la = Launcher(cfg)
    for name in NAMES:
        la._add(name, ["python", "-m", name], {})
    la.group = la.restart_group(clock.now)
    la._restart_due()
    return la, clock, FakeSock()


def proc(la: Launcher, name: str) -> FakeProc:
    pr = la.children[name].proc
    assert isinstance(pr, FakeProc)
    return pr


def test_launcher_restarts_a_dead_frontend_after_its_backoff(
    rig: tuple[Launcher, Clock, FakeSock],
) -> None:
    la, clock, sock = rig
    first = proc(la, "fe0")
    clock.now += 1.0
    first.returncode = 1
    la._reap(sock)  # type: ignore[arg-type]
    assert la.children["fe0"].proc is None
    assert sock.sent == [p.PeerDown("fe0", "process exited with status 1")]
    assert la._next_timeout_ms() == 250
    clock.now += 0.125
    assert la._next_timeout_ms() == 125
    la._restart_due()
    assert la.children["fe0"].proc is None  # not yet
    clock.now += 0.125
    la._restart_due()
    assert proc(la, "fe0") is not first
    assert proc(la, "sup-r0").signals == []  # the others were left alone
    assert la._next_timeout_ms() == 500  # nothing to restart: the watchdog's poll


def test_launcher_restarts_only_the_scheduler_when_it_dies(
    rig: tuple[Launcher, Clock, FakeSock],
) -> None:
    la, clock, sock = rig
    old = {n: proc(la, n) for n in NAMES}
    clock.now += 1.0
    old[LEADER].returncode = -9
    la._reap(sock)  # type: ignore[arg-type]
    assert sock.sent == []  # nobody to tell: the scheduler is the one that listens
    assert old["sup-r0"].signals == [] and old["fe0"].signals == []  # they stream on
    assert [n for n, c in la.children.items() if c.proc is None] == [LEADER]
    clock.now += 0.25
    la._restart_due()
    assert proc(la, LEADER) is not old[LEADER]
    assert all(proc(la, n) is old[n] for n in ("sup-r0", "fe0"))


def test_launcher_retries_a_child_that_could_not_be_started(
    rig: tuple[Launcher, Clock, FakeSock], monkeypatch: pytest.MonkeyPatch
) -> None:
    la, clock, sock = rig
    proc(la, "fe0").returncode = 0
    clock.now += 20.0  # it ran stable: due at once
    la._reap(sock)  # type: ignore[arg-type]

    def no_fork(argv: list[str], **kw: Any) -> FakeProc:
        raise OSError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(launcher_mod.subprocess, "Popen", no_fork)
    la._restart_due()
    assert la.children["fe0"].proc is None
    assert la._next_timeout_ms() == 250
    monkeypatch.setattr(launcher_mod.subprocess, "Popen", FakeProc)
    clock.now += 0.25
    la._restart_due()
    assert proc(la, "fe0").returncode is None


# ---------------------------------------------------------------- the watchdog's wiring


def test_the_watchdog_kills_a_silent_supervisor_and_it_restarts(
    rig: tuple[Launcher, Clock, FakeSock],
) -> None:
    """Issue 12: a child alive but silent (SIGSTOP) was never restarted."""
    la, clock, sock = rig
    limit = la.cfg.server.watchdog_ms / 1000.0
    old = proc(la, "sup-r0")
    for _ in range(int(limit) + 2):  # the scheduler reports every second; sup-r0 went quiet
        clock.now += 1.0
        la._on_notice(
            p.PeersSeen({"fe0": 100, "sup-r0": int((clock.now - 100.0) * 1000)}), None, sock
        )  # type: ignore[arg-type]
        la._watch()
    assert old.signals == [signal.SIGKILL]
    assert proc(la, "fe0").signals == [] and proc(la, LEADER).signals == []
    la._reap(sock)  # type: ignore[arg-type]
    (down,) = sock.sent
    assert isinstance(down, p.PeerDown) and down.ident == "sup-r0"
    assert down.reason.startswith("watchdog: alive but no heartbeat for ")
    clock.now += 1.0
    la._restart_due()
    assert proc(la, "sup-r0") is not old


def test_the_watchdog_kills_a_silent_scheduler_not_the_others(
    rig: tuple[Launcher, Clock, FakeSock],
) -> None:
    la, clock, sock = rig
    limit = la.cfg.server.watchdog_ms / 1000.0
    la._on_notice(p.PeersSeen({"fe0": 0, "sup-r0": 0}), None, sock)  # type: ignore[arg-type]
    clock.now += limit - 0.5
    la._watch()
    assert all(proc(la, n).signals == [] for n in NAMES)
    clock.now += 1.0  # no report for longer than the limit: the scheduler is stuck
    la._watch()
    assert proc(la, LEADER).signals == [signal.SIGKILL]
    assert proc(la, "fe0").signals == [] and proc(la, "sup-r0").signals == []


def test_a_launcher_answers_rehello_with_hello(rig: tuple[Launcher, Clock, FakeSock]) -> None:
    la, clock, sock = rig
    la._on_notice(p.Rehello(), None, sock)  # type: ignore[arg-type]
    (hello,) = sock.sent
    assert isinstance(hello, p.Hello) and hello.role == "launcher"
