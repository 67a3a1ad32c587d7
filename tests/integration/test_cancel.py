"""Cancel is race-free: once the cancel is answered, the stream's terminal frame is already
on the wire, no token follows it, and the engine slot is free again."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.integration.conftest import cancel, metric, stream, submit
from tests.support.daemon import Daemon
from tests.support.sse import SyncStream, sync_request

ONE_SLOT = """
[limits]
resume_grace_ms = 300

[[replicas]]
id = "solo"
slots = 1
[replicas.mock]
ttft_ms = 1
itl_ms = 5
"""


def tokens(s: SyncStream) -> int:
    return sum(1 for e in s.events if e.event == "token")


def test_no_token_after_the_cancel_answer_200_trials(daemon: Daemon) -> None:
    for trial in range(200):
        k = trial % 16  # cancel after 0..15 tokens have been read
        status, body, _ = submit(daemon, max_tokens=5000)
        assert status == 202
        s = stream(daemon, body["task_id"])
        s.read_until(lambda st, k=k: tokens(st) >= k)
        assert cancel(daemon, body["task_id"]) == 204
        # The frontend put the terminal frame on the wire before answering: it is already in
        # our socket's receive buffer, so a non-blocking read must find it.
        s.read_available()
        terminals = [e for e in s.events if e.event in ("end", "error")]
        assert len(terminals) == 1, f"trial {trial}: terminal not on the wire at the 204"
        assert s.events[-1] is terminals[0], f"trial {trial}: an event follows the terminal"
        end = terminals[0].json
        assert terminals[0].event == "end" and end["reason"] == "canceled", end
        assert tokens(s) == end["tokens_out"]
        before = len(s.events)
        s.read_to_end(timeout=5)
        assert s.eof and len(s.events) == before
        s.close()


def test_cancel_before_streaming_then_stream_ends_canceled(daemon: Daemon) -> None:
    status, body, _ = submit(daemon, max_tokens=5000)
    assert cancel(daemon, body["task_id"]) == 204
    events = stream(daemon, body["task_id"]).read_to_end()
    assert [e.event for e in events][-1] == "end"
    assert events[-1].json["reason"] == "canceled"
    assert sum(1 for e in events if e.event in ("end", "error")) == 1


def test_cancel_unknown_is_404_and_repeat_cancel_is_204(daemon: Daemon) -> None:
    status, _, raw = sync_request(
        daemon.host, daemon.port, "POST", "/v1/tasks/t-missing/cancel", daemon.headers
    )
    assert status == 404 and json.loads(raw)["code"] == "NOT_FOUND"
    status, body, _ = submit(daemon, max_tokens=5000)
    assert cancel(daemon, body["task_id"]) == 204
    assert cancel(daemon, body["task_id"]) == 204


@pytest.fixture(scope="module")
def solo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("solo"), ONE_SLOT) as d:
        yield d


def test_cancel_of_a_queued_task_while_streaming(solo: Daemon) -> None:
    _, first, _ = submit(solo, max_tokens=5000)
    _, queued, _ = submit(solo, max_tokens=5)
    assert queued["queue_position"] >= 1
    s = stream(solo, queued["task_id"])
    assert cancel(solo, queued["task_id"]) == 204
    s.read_available()
    assert [e.event for e in s.events] == ["end"]
    assert s.events[0].json["reason"] == "canceled"
    assert cancel(solo, first["task_id"]) == 204


def test_client_disconnect_cancels_after_the_grace_and_frees_the_slot(solo: Daemon) -> None:
    before = metric(solo, "tasks_canceled_total", '{reason="client_disconnect"}')
    _, body, _ = submit(solo, max_tokens=100_000 // 10)
    assert "task_id" in body, body
    s = stream(solo, body["task_id"])
    s.read_until(lambda st: tokens(st) >= 3)
    s.close()  # the client goes away mid-stream (and does not come back with Last-Event-ID)
    # Past limits.resume_grace_ms the only slot must come free: a new task runs to its end.
    _, nxt, _ = submit(solo, max_tokens=3)
    events = stream(solo, nxt["task_id"]).read_to_end(timeout=10)
    assert events[-1].event == "end" and events[-1].json["tokens_out"] == 3
    after = metric(solo, "tasks_canceled_total", '{reason="client_disconnect"}')
    assert after == before + 1
