"""Engine failures: every affected stream gets exactly one WORKER_RESET error quickly, the
engine (or its supervisor) comes back, and other replicas' streams are untouched."""

from __future__ import annotations

import time
from collections.abc import Iterator

import psutil
import pytest

from tests.integration.conftest import run_task, stream, submit
from tests.support.daemon import Daemon
from tests.support.sse import SyncStream
from tests.support.wait import wait_for

LONG = 1500  # tokens: a stream that outlives the fault by a few seconds

TWO = """
[server]
restart_backoff_ms = 100

[[replicas]]
id = "r0"
slots = 16
[replicas.mock]
itl_ms = 2

[[replicas]]
id = "r1"
slots = 16
[replicas.mock]
itl_ms = 2
"""

CRASHY = """
[server]
restart_backoff_ms = 100

[[replicas]]
id = "crashy"
slots = 4
[replicas.mock]
itl_ms = 1
crash_after_tokens = 30
"""

STALLING = """
[[replicas]]
id = "staller"
slots = 4
decode_timeout_ms = 300
[replicas.mock]
itl_ms = 1
stall_after_tokens = 5
"""


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("two"), TWO) as d:
        yield d


def terminal(s: SyncStream) -> list:
    return [e for e in s.events if e.event in ("end", "error")]


def open_streams(d: Daemon, n: int) -> dict[str, list[SyncStream]]:
    by_replica: dict[str, list[SyncStream]] = {"r0": [], "r1": []}
    for _ in range(n):
        status, body, _ = submit(d, max_tokens=LONG)
        assert status == 202
        s = stream(d, body["task_id"])
        s.read_until(lambda st: any(e.event == "token" for e in st.events))
        by_replica[s.events[0].json["replica_id"]].append(s)
    assert by_replica["r0"] and by_replica["r1"], "placement should use both replicas"
    return by_replica


def ready_count(d: Daemon, replica: str) -> int:
    return d.count_log(
        lambda r: r.get("narration") == "engine ready" and r.get("replica_id") == replica
    )


def assert_reset_and_others_untouched(victims: list[SyncStream], others: list[SyncStream]) -> None:
    for s in victims:
        s.read_until(lambda st: bool(terminal(st)), timeout=5)
        (err,) = terminal(s)
        assert err.event == "error", s.events[-3:]
        assert err.json["code"] == "WORKER_RESET"
        assert err.json["retriable"] is True
        s.read_to_end(timeout=5)
        assert len(terminal(s)) == 1
    for s in others:
        events = s.read_to_end(timeout=30)
        assert events[-1].event == "end" and events[-1].json["tokens_out"] == LONG
        assert len(terminal(s)) == 1


def first_error_within(victims: list[SyncStream], t0: float, limit_s: float) -> None:
    for s in victims:
        s.read_until(lambda st: bool(terminal(st)), timeout=5)
    elapsed = time.monotonic() - t0
    assert elapsed < limit_s, f"WORKER_RESET took {elapsed:.3f}s"


def test_killed_engine_resets_its_streams_and_comes_back(two: Daemon) -> None:
    streams = open_streams(two, 6)
    before = ready_count(two, "r0")
    sup = two.find("engine_procs.supervisor", "0")
    (engine,) = [c for c in sup.children() if "engine_procs.mock_engine" in c.cmdline()]
    t0 = time.monotonic()
    engine.kill()
    first_error_within(streams["r0"], t0, 1.0)
    assert_reset_and_others_untouched(streams["r0"], streams["r1"])
    wait_for(lambda: ready_count(two, "r0") > before, 10, "engine r0 did not come back")
    assert replica_serves(two, "r0")


def test_kill9_supervisor_resets_its_streams_and_comes_back(two: Daemon) -> None:
    streams = open_streams(two, 6)
    before = ready_count(two, "r0")
    sup = two.find("engine_procs.supervisor", "0")
    t0 = time.monotonic()
    sup.kill()  # SIGKILL: no goodbye, no cleanup
    first_error_within(streams["r0"], t0, 1.0)
    assert_reset_and_others_untouched(streams["r0"], streams["r1"])
    wait_for(lambda: ready_count(two, "r0") > before, 15, "supervisor r0 did not come back")
    new = two.find("engine_procs.supervisor", "0")
    assert new.pid != sup.pid
    assert (
        not psutil.pid_exists(sup.pid) or psutil.Process(sup.pid).status() == psutil.STATUS_ZOMBIE
    )
    assert replica_serves(two, "r0")


def replica_serves(d: Daemon, replica: str) -> bool:
    """Tasks land on the replica again and complete there."""
    for _ in range(20):
        s = run_task(d, max_tokens=5)
        if s.events[0].json["replica_id"] == replica:
            return s.events[-1].event == "end" and s.events[-1].json["tokens_out"] == 5
    return False


def test_injected_engine_crash(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path, CRASHY).start()
    try:
        s = run_task(d, max_tokens=100)
        assert s.events[-1].event == "error"
        assert s.events[-1].json["code"] == "WORKER_RESET"
        assert 0 < sum(1 for e in s.events if e.event == "token") <= 100
        wait_for(lambda: ready_count(d, "crashy") >= 2, 10, "engine did not restart")
        ok = run_task(d, max_tokens=10)  # below the crash point: runs to its end
        assert ok.events[-1].event == "end" and ok.events[-1].json["tokens_out"] == 10
    finally:
        assert d.stop() == 0


def test_stalled_engine_gives_decode_timeout(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path, STALLING).start()
    try:
        s = run_task(d, max_tokens=50)
        assert s.events[-1].event == "error"
        assert s.events[-1].json["code"] == "DECODE_TIMEOUT"
        assert sum(1 for e in s.events if e.event == "token") == 5
    finally:
        assert d.stop() == 0


ERRORING = """
[[replicas]]
id = "erring"
[replicas.mock]
itl_ms = 1
error_after_tokens = 3
"""

FIREHOSE = """
[limits]
stream_buffer_bytes = 65536
max_tokens_limit = 100000000

[[replicas]]
id = "fast"
[replicas.mock]
itl_ms = 0
tokens_per_step = 64
"""


def test_engine_error_is_internal(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path, ERRORING).start()
    try:
        s = run_task(d, max_tokens=50)
        assert s.events[-1].event == "error" and s.events[-1].json["code"] == "INTERNAL"
        assert sum(1 for e in s.events if e.event == "token") == 3
    finally:
        assert d.stop() == 0


def test_a_client_that_does_not_read_is_cut_off(tmp_path) -> None:  # type: ignore[no-untyped-def]
    d = Daemon(tmp_path, FIREHOSE).start()
    try:
        status, body, _ = submit(d, max_tokens=50_000_000)
        assert status == 202
        s = stream(d, body["task_id"])
        # Read nothing until the frontend has given up on us...
        d.wait_log(
            lambda r: r.get("narration") == "stream ended" and r.get("reason") == "canceled", 30
        )
        events = s.read_to_end(timeout=30)  # ...then everything that was sent
        assert events[-1].event == "error" and events[-1].json["code"] == "STREAM_OVERFLOW"
        assert sum(1 for e in events if e.event in ("end", "error")) == 1
    finally:
        assert d.stop() == 0
