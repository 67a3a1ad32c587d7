"""Admission policies through the daemon: deadlines from measured throughput, full-queue
policies with retry advice, and fairness across API keys."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import run_task, stream, submit
from tests.support.daemon import Daemon
from tests.support.wait import wait_for

ONE_SLOT = """
[server]
api_keys = ["k-flood", "k-quiet"]
drain_deadline_ms = 500

[limits]
queue_capacity = {cap}

[scheduling]
queue_policy = "{policy}"

[[replicas]]
id = "r0"
slots = 1
[replicas.mock]
itl_ms = {itl}
"""


def daemon_with(tmp: Path, policy: str, cap: int, itl: float = 2) -> Daemon:
    return Daemon(tmp, ONE_SLOT.format(policy=policy, cap=cap, itl=itl), key="k-flood").start()


@pytest.fixture
def reject(tmp_path: Path) -> Iterator[Daemon]:
    d = daemon_with(tmp_path, "reject", 2)
    try:
        yield d
    finally:
        assert d.stop() == 0


def test_deadline_unmet_from_measured_throughput(reject: Daemon) -> None:
    # No measurement yet: nothing to predict from, so nothing is refused.
    status, body, _ = submit(reject, max_tokens=20, deadline_ms=1)
    assert status == 202
    stream(reject, body["task_id"]).read_to_end()
    run_task(reject, max_tokens=50)  # now ~2 ms per token is measured
    status, body, _ = submit(reject, max_tokens=2000, deadline_ms=500)
    assert status == 400 and body["code"] == "DEADLINE_UNMET"
    assert "predicted finish" in body["message"]
    status, body, _ = submit(reject, max_tokens=2000, deadline_ms=60_000)
    assert status == 202


def test_reject_policy_gives_retry_advice(reject: Daemon) -> None:
    ids = []
    for _ in range(3):  # one running, two queued: the queue is full
        status, body, _ = submit(reject, max_tokens=5000, deadline_ms=600_000)
        assert status == 202
        ids.append(body["task_id"])
    status, body, headers = submit(reject, max_tokens=5, deadline_ms=600_000)
    assert status == 429 and body["code"] == "ADMISSION_REJECT"
    assert body["retriable"] is True and body["policy_label"] == "reject"
    assert body["retry_after_ms"] >= 1
    assert (
        int(headers["retry-after"]) >= 1 and int(headers["x-backoff-ms"]) == body["retry_after_ms"]
    )


def test_drop_lru_drops_the_oldest_batch_task(tmp_path: Path) -> None:
    d = daemon_with(tmp_path, "drop-lru", 2)
    try:
        status, running, _ = submit(d, max_tokens=5000, deadline_ms=600_000)
        _, old, _ = submit(d, priority="batch", max_tokens=5, deadline_ms=600_000)
        _, newer, _ = submit(d, priority="batch", max_tokens=5, deadline_ms=600_000)
        old_stream = stream(d, old["task_id"])
        status, body, _ = submit(d, priority="interactive", max_tokens=5, deadline_ms=600_000)
        assert status == 202  # the newcomer is admitted...
        events = old_stream.read_to_end(timeout=10)  # ...and the oldest batch task is dropped
        assert [e.event for e in events] == ["error"]
        assert events[0].json["code"] == "QUEUE_FULL_DROP_LRU" and events[0].json["retriable"]
        admitted = lambda: d.count_log(lambda r: r.get("narration") == "admitted")  # noqa: E731
        wait_for(lambda: admitted() == 4, 10, "four admissions in the log")
    finally:
        assert d.stop() == 0


def test_a_flood_from_one_key_does_not_starve_another(tmp_path: Path) -> None:
    # One slot, ~110 ms a task: a backlog builds (each POST also waits for the journal's fsync).
    d = daemon_with(tmp_path, "reject", 200, itl=10)
    try:
        flood = []
        for _ in range(40):
            status, body, _ = submit(d, max_tokens=10, deadline_ms=600_000)
            assert status == 202
            flood.append(body["task_id"])
        d.key = "k-quiet"
        quiet = []
        for _ in range(3):
            status, body, _ = submit(d, max_tokens=10, deadline_ms=600_000)
            assert status == 202 and body["queue_position"] <= 8
            quiet.append(body["task_id"])
        d.wait_log(
            lambda r: (
                r.get("narration") == "placed"
                and r.get("task_id", "").partition("/")[2] == flood[-1]
            ),
            60,
        )
        # The scheduler logs admissions and placements in the order it made them (with the
        # ids namespaced by key: <key id>/<task id>).
        log = [(r["narration"], r["task_id"].partition("/")[2]) for r in d.lines
               if r.get("component") == "scheduler" and r.get("narration") in ("admitted", "placed")]  # fmt: skip
        placed = [t for n, t in log if n == "placed"]
        at_arrival = sum(1 for n, t in log[: log.index(("admitted", quiet[0]))] if n == "placed")
        backlog = len(flood) - at_arrival
        assert backlog >= 10, f"no backlog to be fair about ({backlog})"
        worst = max(placed.index(t) for t in quiet)
        # FIFO would run the whole backlog first; fair sharing alternates the two keys.
        assert worst - at_arrival <= 2 * len(quiet) + 1, (at_arrival, worst, backlog)
    finally:
        assert d.stop() == 0
