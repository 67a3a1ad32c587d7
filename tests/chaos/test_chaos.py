"""Chaos: each process type killed (SIGKILL) or paused past the heartbeat limit, mid-stream.

For every fault, with streams running on both replicas through two frontends and more tasks
queued behind them, followed by clients that resume with ``Last-Event-ID``:

- every stream ends with exactly one terminal event, or resumes without a gap (ids increase,
  token indices run 0..n-1 with no hole or repeat); an error is retriable;
- no stream hangs: each ends within ``FOLLOW_S``;
- no accepted task is lost: every one reaches a terminal event, none answers 404;
- service comes back within ``BACK_S`` of the fault's end;
- after a clean stop nothing is left in /dev/shm or the run directory.

The short cases run in ``make test``; ``make chaos`` runs the ``chaos``-marked long ones (more
streams, several rounds) and prints the figures the note quotes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.support.chaos import (
    Kind,
    Target,
    check_streams,
    follow,
    inject,
    leftovers,
    process_of,
    serves_again,
    submit,
)
from tests.support.daemon import Daemon
from tests.support.wait import wait_for

HEARTBEAT_LIMIT_S = 1.0  # server.peer_timeout_ms below
PAUSE_S = 2.5  # past the heartbeat limit (and the watchdog), as the issue asks
FOLLOW_S = 60.0  # the bound on any stream's life in these runs: past it, it hung
BACK_S = 15.0  # service is back within this many seconds of the fault's end

CONFIG = """
[server]
heartbeat_ms = 200
peer_timeout_ms = 1000
watchdog_ms = 2000
restart_backoff_ms = 100
state_dir = "{state}"

[limits]
resume_grace_ms = 5000

[[replicas]]
id = "r0"
slots = {slots}
decode_timeout_ms = 1000
[replicas.mock]
itl_ms = {itl}

[[replicas]]
id = "r1"
slots = {slots}
decode_timeout_ms = 1000
[replicas.mock]
itl_ms = {itl}
"""

TARGETS: list[Target] = ["engine", "supervisor", "frontend", "scheduler", "launcher"]
KINDS: list[Kind] = ["kill", "pause"]


def config(state: Path, slots: int, itl: int) -> str:
    return CONFIG.format(state=state, slots=slots, itl=itl)


def one_round(d: Daemon, target: Target, kind: Kind, running: int, queued: int, tokens: int):
    """Submit, follow, fault; returns (followers, seconds until service was back)."""
    ids = [submit(d, tokens) for _ in range(running + queued)]
    following = follow(d, ids, FOLLOW_S)
    wait_for(lambda: sum(1 for f in following.followers if f.token_indices()) >= running // 2,
             20, "streams did not start")  # fmt: skip
    victim = process_of(d, target)
    inject(victim, kind, PAUSE_S)
    if target == "launcher" and kind == "kill":
        d.restart_after_kill()  # the operator's (or systemd's) restart, same port and state
    back = serves_again(d, BACK_S)
    return following.join(), back


def run_case(tmp: Path, target: Target, kind: Kind, rounds: int, running: int, queued: int,
             tokens: int, itl: int) -> dict[str, object]:  # fmt: skip
    d = Daemon(tmp, config(tmp / "state", slots=running // 2, itl=itl), frontends=2).start()
    pids = {d.proc.pid}  # type: ignore[union-attr]
    run_dirs = {d.run_dir}
    outcomes: dict[str, int] = {}
    backs: list[float] = []
    try:
        for _ in range(rounds):
            fs, back = one_round(d, target, kind, running, queued, tokens)
            pids.add(d.proc.pid)  # type: ignore[union-attr]
            run_dirs.add(d.run_dir)
            backs.append(back)
            for k, n in check_streams(fs, tokens).items():
                outcomes[k] = outcomes.get(k, 0) + n
            assert back < BACK_S
    finally:
        assert d.stop() == 0
    left = [x for pid in pids for rd in run_dirs for x in leftovers(pid, rd)]
    assert not left, f"left behind: {left}"
    return {"outcomes": outcomes, "back_s_max": round(max(backs), 2)}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_fault_mid_stream(tmp_path: Path, target: Target, kind: Kind) -> None:
    run_case(tmp_path, target, kind, rounds=1, running=4, queued=2, tokens=200, itl=10)


@pytest.mark.chaos
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("target", TARGETS)
def test_fault_mid_stream_long(tmp_path: Path, target: Target, kind: Kind) -> None:
    t0 = time.monotonic()
    fig = run_case(tmp_path, target, kind, rounds=3, running=16, queued=16, tokens=300, itl=10)
    print(f"\nchaos {target:10} {kind:5} {fig} in {time.monotonic() - t0:.1f}s")
