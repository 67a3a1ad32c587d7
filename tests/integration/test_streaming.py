"""Streams end to end through the real daemon: order, completeness, contract details."""

from __future__ import annotations

import asyncio
import json
from contextlib import closing

from engine_procs.mock_engine import prompt_tokens
from tests.integration.conftest import metric, run_task, stream, submit
from tests.support.daemon import Daemon
from tests.support.sse import Event, async_request, async_stream
from tests.support.tasks import task_body
from tests.support.wait import wait_for


def settled(daemon: Daemon, name: str) -> float:
    """A counter once every task has ended at the scheduler (a client sees its end frame
    before the scheduler hears of it)."""
    wait_for(lambda: metric(daemon, "replica_active_slots") == 0, 10, "tasks to settle")
    return metric(daemon, name)


def check_stream(events: list[Event], max_tokens: int) -> None:
    """started → token* → end, ids 0.. consecutive, token i consecutive, counts agree."""
    assert [e.event for e in events[:1]] == ["started"], events[:3]
    assert events[-1].event == "end", events[-3:]
    assert [int(e.id or -1) for e in events] == list(range(len(events)))
    tokens = [e.json for e in events if e.event == "token"]
    assert [t["i"] for t in tokens] == list(range(max_tokens))
    assert all(isinstance(t["t"], str) for t in tokens)
    end = events[-1].json
    assert end["tokens_out"] == max_tokens
    assert end["reason"] == "length"
    assert sum(1 for e in events if e.event in ("end", "error")) == 1


def test_one_stream_follows_the_contract(daemon: Daemon) -> None:
    status, body, headers = submit(daemon, max_tokens=12)
    assert status == 202
    assert set(body) == {"task_id", "queue_position", "predicted_start_ms", "backoff_ms"}
    assert headers["content-type"].startswith("application/json")
    with closing(stream(daemon, body["task_id"])) as s:
        assert s.status == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        assert s.headers["cache-control"] == "no-cache"
        assert s.headers["x-accel-buffering"] == "no"
        assert s.headers["x-correlation-id"]
        events = s.read_to_end()
    check_stream(events, 12)
    started = events[0].json
    assert started["engine"] == "mock"
    assert started["engine_version"] == "mock-1.0"
    assert started["pool_id"] == "default"
    assert started["replica_id"] in ("r0", "r1")
    assert {"queue_position", "predicted_start_ms"} <= set(started)
    end = events[-1].json
    assert end["decode_ms"] >= end["decode_time_ms"] >= 0


def test_200_concurrent_streams_complete_in_order(daemon: Daemon) -> None:
    n, max_tokens = 200, 64

    async def one(i: int) -> list[Event]:
        body = task_body(max_tokens=max_tokens, seed=i)
        status, _, raw = await async_request(
            daemon.host, daemon.port, "POST", "/v1/tasks", daemon.headers, body
        )
        assert status == 202, raw
        res = await async_stream(
            daemon.host, daemon.port, f"/v1/tasks/{body['task_id']}/stream", daemon.headers
        )
        assert res.status == 200
        return res.events

    async def main() -> list[list[Event]]:
        return await asyncio.gather(*(one(i) for i in range(n)))

    before_out, before_in = settled(daemon, "tokens_out_total"), metric(daemon, "tokens_in_total")
    results = asyncio.run(main())
    assert len(results) == n
    for events in results:
        check_stream(events, max_tokens)
    assert settled(daemon, "tokens_out_total") - before_out == n * max_tokens
    assert metric(daemon, "tokens_in_total") - before_in == n * prompt_tokens("hello")


def test_a_tasks_prompt_tokens_are_counted_when_it_ends(daemon: Daemon) -> None:
    prompt = "Hello, world! Count me in."
    # The mock engine's tokenizer: Hello 2 , 1 world 2 ! 1 Count 2 me 1 in 1 . 1
    assert prompt_tokens(prompt) == 11
    before = settled(daemon, "tokens_in_total")
    s = run_task(daemon, prompt=prompt, max_tokens=4)
    assert s.events[-1].event == "end"
    assert settled(daemon, "tokens_in_total") - before == 11
    run_task(daemon, prompt="", max_tokens=4)  # an empty prompt costs nothing
    assert settled(daemon, "tokens_in_total") - before == 11


def test_events_before_the_stream_opens_are_replayed(daemon: Daemon) -> None:
    status, body, _ = submit(daemon, max_tokens=20)
    assert status == 202
    tid = body["task_id"]
    daemon.wait_log(
        lambda r: (
            r.get("narration") == "stream ended" and r.get("task_id", "").partition("/")[2] == tid
        ),
        10,
    )
    with closing(stream(daemon, tid)) as s:
        check_stream(s.read_to_end(), 20)


def test_unknown_task_stream_is_404_envelope(daemon: Daemon) -> None:
    with closing(stream(daemon, "t-nope")) as s:
        s.read_until(lambda st: b"}" in st.body, 5)
    assert s.status == 404
    env = json.loads(s.body)
    assert env["code"] == "NOT_FOUND"
    assert set(env) == {"code", "message", "retriable"}  # optional fields: never null


def test_second_concurrent_stream_of_a_task_is_refused(daemon: Daemon) -> None:
    status, body, _ = submit(daemon, max_tokens=2000)
    with closing(stream(daemon, body["task_id"])) as first:
        first.read_until(lambda st: len(st.events) >= 2)
        with closing(stream(daemon, body["task_id"])) as second:
            second.read_until(lambda st: b"}" in st.body, 5)
        assert second.status == 400
        assert json.loads(second.body)["code"] == "INVALID_PARAMS"
