"""Issue 12, failures 1-3, made real: processes paused with SIGSTOP/SIGCONT past the heartbeat
limit, a child that stays stopped, a pool that cannot load, a task that cannot be placed, a
launcher killed with SIGKILL. Heartbeat limits are short here so each fault is quick."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.integration.conftest import run_task, stream, submit
from tests.support.daemon import Daemon
from tests.support.sse import SyncStream, sync_request
from tests.support.wait import wait_for

# Heartbeats every 200 ms; a peer silent for 1 s is taken as dead; the launcher's watchdog
# (a child alive but unheard) is far off here, and short in WATCHDOG below.
LIVENESS = """
[server]
heartbeat_ms = 200
peer_timeout_ms = 1000
watchdog_ms = {watchdog_ms}
restart_backoff_ms = 100
restart_backoff_max_ms = 400

[[replicas]]
id = "r0"
slots = 8
[replicas.mock]
itl_ms = 2

[[replicas]]
id = "r1"
slots = 8
[replicas.mock]
itl_ms = 2
"""
PAUSE_S = 3.0  # past peer_timeout_ms (and the scheduler's stall threshold, 1.5 s)
RESTORED_S = 5.0  # service is back within this long of SIGCONT
LONG = 2000  # tokens at 2 ms: a stream that outlives the fault


@pytest.fixture(scope="module")
def paused(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    cfg = LIVENESS.format(watchdog_ms=60_000)
    with Daemon(tmp_path_factory.mktemp("liveness"), cfg) as d:
        yield d


def get(d: Daemon, path: str) -> dict[str, Any]:
    status, _, raw = sync_request(d.host, d.port, "GET", path, d.headers, timeout=15)
    assert status == 200, raw
    body: dict[str, Any] = json.loads(raw)
    return body


def ready_replicas(d: Daemon, pool: str = "default") -> int:
    n: int = get(d, f"/v1/pools/{pool}/health")["metrics"]["ready_replicas"]
    return n


def terminal(s: SyncStream) -> list[Any]:
    return [e for e in s.events if e.event in ("end", "error")]


def serves(d: Daemon, replica: str) -> bool:
    """Tasks land on ``replica`` again and complete there."""
    for _ in range(20):
        s = run_task(d, max_tokens=5)
        if s.events[0].json["replica_id"] == replica:
            return s.events[-1].event == "end" and s.events[-1].json["tokens_out"] == 5
    return False


def pause(proc: psutil.Process, seconds: float) -> float:
    """SIGSTOP ``proc`` for ``seconds`` (the fault itself), SIGCONT; returns when it resumed."""
    proc.suspend()
    time.sleep(seconds)
    proc.resume()
    return time.monotonic()


def dead_verdicts(d: Daemon) -> int:
    return d.count_log(
        lambda r: r.get("narration") == "peer missed its heartbeats; treating it as dead"
    )


def test_a_paused_scheduler_judges_nobody_dead_and_serves_at_once(paused: Daemon) -> None:
    """Failure 1: resumed after a pause past the heartbeat limit, the scheduler ran its timer
    before it read the queued heartbeats, took every peer as dead for good: ready_replicas 0,
    POST still 202, every stream hung."""
    d = paused
    assert run_task(d).events[-1].event == "end"
    before = dead_verdicts(d)
    for _ in range(2):  # (where in its loop a pause lands varies: twice)
        resumed = pause(d.find("orchd.scheduler.loop"), PAUSE_S)
        s = run_task(d, max_tokens=20)
        restored = time.monotonic() - resumed
        assert s.events[-1].event == "end" and s.events[-1].json["tokens_out"] == 20
        assert restored < RESTORED_S, f"service came back {restored:.2f}s after SIGCONT"
        assert ready_replicas(d) == 2
        assert dead_verdicts(d) == before, "a peer was taken as dead for the scheduler's pause"
    d.wait_log(lambda r: r.get("narration", "").startswith("the scheduler did not run"), 5)
    assert serves(d, "r0")


def test_a_paused_supervisor_resets_its_streams_then_its_replica_comes_back(
    paused: Daemon,
) -> None:
    """Failure 2: a supervisor paused past the heartbeat limit lost its replica for good,
    while health said live."""
    d = paused
    streams: dict[str, list[SyncStream]] = {"r0": [], "r1": []}
    for _ in range(6):
        status, body, _ = submit(d, max_tokens=LONG)
        assert status == 202
        s = stream(d, body["task_id"])
        s.read_until(lambda st: any(e.event == "token" for e in st.events))
        streams[s.events[0].json["replica_id"]].append(s)
    assert streams["r0"] and streams["r1"]
    sup = d.find("engine_procs.supervisor", "0")
    sup.suspend()
    # While it is stopped, health must not call it live and ready.
    wait_for(lambda: ready_replicas(d) == 1, 5, "health to drop the paused replica")
    (r0,) = [r for r in get(d, "/v1/pools/default/health")["metrics"]["replica_health"]
             if r["replica_id"] == "r0"]  # fmt: skip
    assert r0["live"] is False and r0["ready"] is False
    for s in streams["r0"]:  # its streams end with one retriable error
        s.read_until(lambda st: bool(terminal(st)), timeout=10)
        (err,) = terminal(s)
        assert err.event == "error" and err.json["code"] == "WORKER_RESET"
        assert err.json["retriable"] is True
    time.sleep(max(0.0, PAUSE_S - 1.5))  # (the rest of the pause: the fault itself)
    sup.resume()
    resumed = time.monotonic()
    wait_for(lambda: ready_replicas(d) == 2, RESTORED_S, "the paused replica to be taken back")
    restored = time.monotonic() - resumed
    assert serves(d, "r0"), "the replica is ready again but no task completes on it"
    assert restored < RESTORED_S
    d.wait_log(lambda r: r.get("narration") == "peer rejoined" and r.get("peer") == "sup-r0", 5)
    assert sup.is_running() and d.find("engine_procs.supervisor", "0").pid == sup.pid
    for s in streams["r1"]:  # the other replica's streams never noticed
        events = s.read_to_end(timeout=60)
        assert events[-1].event == "end" and events[-1].json["tokens_out"] == LONG
        assert len(terminal(s)) == 1
    for s in streams["r0"]:
        s.read_to_end(timeout=5)
        assert len(terminal(s)) == 1  # nothing after the error


def test_a_paused_frontend_is_taken_back_when_it_speaks_again(paused: Daemon) -> None:
    """A frontend taken as dead for a pause is asked to say hello on its next heartbeat and
    taken back: it serves at once, and the scheduler counts it again."""
    d = paused
    fe = d.find("orchd.frontend.main")
    before = d.count_log(lambda r: r.get("narration") == "peer rejoined" and r.get("peer") == "fe0")
    resumed = pause(fe, PAUSE_S)
    s = run_task(d, max_tokens=5)
    restored = time.monotonic() - resumed
    assert s.events[-1].event == "end" and restored < RESTORED_S
    wait_for(
        lambda: (
            d.count_log(lambda r: r.get("narration") == "peer rejoined" and r.get("peer") == "fe0")
            > before
        ),
        RESTORED_S,
        "the scheduler to take the frontend back",
    )


# ---------------------------------------------------------------- the launcher's watchdog


@pytest.fixture(scope="module")
def watched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    cfg = LIVENESS.format(watchdog_ms=2_000)
    with Daemon(tmp_path_factory.mktemp("watchdog"), cfg) as d:
        yield d


def test_the_watchdog_kills_and_restarts_a_supervisor_that_stays_stopped(watched: Daemon) -> None:
    d = watched
    sup = d.find("engine_procs.supervisor", "0")
    sup.suspend()  # and never resumed
    rec = d.wait_log(lambda r: r.get("narration") == "child is alive but silent; killing it", 15)
    assert rec["child"] == "sup-r0" and rec["pid"] == sup.pid and rec["silent_s"] > 2.0
    died = d.wait_log(
        lambda r: r.get("narration") == "child died" and r.get("child") == "sup-r0", 5
    )
    assert died["why"].startswith("watchdog: alive but no heartbeat for ")
    wait_for(lambda: _gone(sup.pid), 5, "the stopped supervisor to be killed")
    wait_for(lambda: ready_replicas(d) == 2, 15, "the restarted supervisor to serve")
    assert d.find("engine_procs.supervisor", "0").pid != sup.pid
    (r0,) = [r for r in get(d, "/v1/pools/default/health")["metrics"]["replica_health"]
             if r["replica_id"] == "r0"]  # fmt: skip
    assert r0["last_down"].startswith("watchdog: alive but no heartbeat")  # health says why
    assert serves(d, "r0")


def test_the_watchdog_kills_and_restarts_a_scheduler_that_stays_stopped(watched: Daemon) -> None:
    d = watched
    sched = d.find("orchd.scheduler.loop")
    sched.suspend()  # and never resumed
    rec = d.wait_log(
        lambda r: (
            r.get("narration") == "child is alive but silent; killing it"
            and r.get("child") == "scheduler"
        ),
        15,
    )
    assert rec["pid"] == sched.pid
    wait_for(
        lambda: _pid(d, "orchd.scheduler.loop") not in (None, sched.pid), 15, "a new scheduler"
    )

    def serving() -> bool:
        try:
            return run_task(d, max_tokens=5).events[-1].event == "end"
        except (AssertionError, OSError, TimeoutError):
            return False

    wait_for(serving, 30, "service after the scheduler's restart")


# ---------------------------------------------------------------- no task waits for nothing


POOLS = """
[server]
restart_backoff_ms = 100
restart_backoff_max_ms = 400

[[pools]]
id = "busy"
model_ref = "mock:tiny"
[[pools]]
id = "free"
model_ref = "mock:other"
[[pools]]
id = "broken"
model_ref = "file:/nonexistent/orchd-liveness-model.bin"

[[replicas]]
id = "busy0"
pool_id = "busy"
slots = 1
[replicas.mock]
itl_ms = 2
[[replicas]]
id = "free0"
pool_id = "free"
model_ref = "mock:other"
slots = 64
[[replicas]]
id = "broken0"
pool_id = "broken"
model_ref = "file:/nonexistent/orchd-liveness-model.bin"
"""
BROKEN = "file:/nonexistent/orchd-liveness-model.bin"


@pytest.fixture(scope="module")
def pools(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("liveness-pools"), POOLS) as d:
        yield d


def test_a_model_no_pool_can_load_is_503_pool_unready_not_a_silent_202(pools: Daemon) -> None:
    """Failure 3: it was accepted (202) and its stream hung with no event."""
    status, body, headers = submit(pools, model_ref=BROKEN)
    assert status == 503, body
    assert body["code"] == "POOL_UNREADY" and body["pool_id"] == "broken"
    assert body["retriable"] is True and "cannot load model" in body["message"]
    assert int(headers["retry-after"]) >= 1


def test_a_queued_task_whose_deadline_passes_ends_deadline_unmet(pools: Daemon) -> None:
    """Failure 3: deadline_ms was never enforced while a task waited in the queue. (First to
    run a task on this daemon: with no token times measured yet, admission cannot predict
    the deadline is missed, so the task is queued.)"""
    status, body, _ = submit(pools, max_tokens=LONG)
    assert status == 202
    hog = stream(pools, body["task_id"])
    hog.read_until(lambda st: any(e.event == "token" for e in st.events))
    status, body, _ = submit(pools, max_tokens=5, deadline_ms=600)
    assert status == 202
    t0 = time.monotonic()
    s = stream(pools, body["task_id"])
    events = s.read_to_end(timeout=10)
    took = time.monotonic() - t0
    assert [e.event for e in events] == ["error"], events
    assert events[0].json["code"] == "DEADLINE_UNMET"
    assert took < 2.0, f"the deadline error came {took:.2f}s after a 600 ms deadline"
    assert hog.read_to_end(timeout=60)[-1].event == "end"


def test_a_task_for_a_busy_pool_blocks_no_task_for_a_free_one(pools: Daemon) -> None:
    """Failure 3: the queue looked only at each key's head, so with one key a task waiting
    for a busy pool held back tasks for a free one."""
    status, body, _ = submit(pools, max_tokens=LONG)  # busy0's only slot, for ~4 s
    assert status == 202
    hog = stream(pools, body["task_id"])
    hog.read_until(lambda st: any(e.event == "token" for e in st.events))
    status, body, _ = submit(pools, max_tokens=5)  # waits for busy0
    assert status == 202
    waiting = body["task_id"]
    t0 = time.monotonic()
    s = run_task(pools, model_ref="mock:other", max_tokens=5)
    took = time.monotonic() - t0
    assert s.events[0].json["pool_id"] == "free" and s.events[-1].event == "end"
    assert took < 1.5, f"a task for the free pool waited {took:.2f}s behind a busy pool's"
    assert hog.read_to_end(timeout=60)[-1].event == "end"
    after = stream(pools, waiting).read_to_end(timeout=30)
    assert after[-1].event == "end"


# ---------------------------------------------------------------- a launcher killed with -9


def test_a_launcher_killed_with_sigkill_leaves_no_run_directory_behind(tmp_path: Path) -> None:
    cfg = LIVENESS.format(watchdog_ms=60_000)
    (tmp_path / "a").mkdir()
    first = Daemon(tmp_path / "a", cfg).start()
    stale = first.run_dir
    assert os.path.isdir(stale)
    assert first.proc is not None
    first.proc.send_signal(signal.SIGKILL)
    assert first.stop() == -signal.SIGKILL
    wait_for(lambda: all(_gone(pid) for pid in _children(first)), 10,
             "the killed launcher's children to die with it")  # fmt: skip
    assert os.path.isdir(stale)  # nobody could clean up
    (tmp_path / "b").mkdir()
    with Daemon(tmp_path / "b", cfg) as second:
        assert second.run_dir != stale
        assert not os.path.exists(stale), "the next start did not reclaim the stale run dir"
        second.wait_log(
            lambda r: (
                r.get("narration") == "removed run directories of orchd instances that are gone"
            ),
            5,
        )


def _children(d: Daemon) -> list[int]:
    return [int(r["pid"]) for r in d.lines if r.get("narration") == "started child"]


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _pid(d: Daemon, module: str) -> int | None:
    try:
        return d.find(module).pid
    except LookupError:
        return None  # (between a death and its restart)
