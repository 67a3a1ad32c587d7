"""Sessions and budgets through the daemon: headers, views, refusals before enqueue,
enforcement during a stream, and `metrics` frames."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import closing
from typing import Any

import pytest

from engine_procs.mock_engine import prompt_tokens
from tests.integration.conftest import stream, submit, task_body
from tests.support.daemon import Daemon
from tests.support.sse import Event, sync_request
from tests.support.wait import wait_for

BUDGETS = """
[server]
api_keys = ["k-alpha", "k-beta", "k-gamma"]

[scheduling]
metrics_interval_ms = 50

[sessions]
cost_per_token = 0.5
[sessions.key_budgets."k-beta"]
tokens = 100
[sessions.key_budgets."k-gamma"]
time_ms = 300
cost = 1000.0

[[replicas]]
id = "r0"
[replicas.mock]
itl_ms = 2
"""


@pytest.fixture(scope="module")
def budgets(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("budgets"), BUDGETS, key="k-alpha") as d:
        yield d


def read_all(d: Daemon, task_id: str, timeout: float = 30.0) -> list[Event]:
    """The task's whole stream, on a connection closed afterwards."""
    with closing(stream(d, task_id)) as s:
        return s.read_to_end(timeout)


def as_key(d: Daemon, key: str) -> Daemon:
    d.key = key
    return d


def session(d: Daemon, sid: str, key: str) -> tuple[int, dict[str, Any]]:
    status, _, raw = sync_request(d.host, d.port, "GET", f"/v1/sessions/{sid}", {"X-API-Key": key})
    return status, json.loads(raw) if raw else {}


KV_BYTES_PER_TOKEN = 1024  # the pools' default


def test_session_view_turns_and_delete(budgets: Daemon) -> None:
    d = as_key(budgets, "k-alpha")
    prompts = ["hello", "a longer prompt, with a comma"]
    for prompt in prompts:
        status, body, _ = submit(d, session_id="s-view", max_tokens=10, prompt=prompt)
        assert status == 202
        read_all(d, body["task_id"])
    # Each turn is charged its prompt (as the engine counted it) and its output.
    used = sum(prompt_tokens(p) + 10 for p in prompts)
    assert used == (2 + 10) + (10 + 10)  # hello 2; a 1 longer 2 prompt 2 , 1 with 1 a 1 comma 2
    kv_bytes = used * KV_BYTES_PER_TOKEN

    def settled() -> bool:  # the client sees its end before the scheduler settles the turn
        return session(d, "s-view", "k-alpha")[1].get("kv_bytes") == kv_bytes

    wait_for(settled, 10, f"the session's kv_bytes to reach {kv_bytes}")
    status, s = session(d, "s-view", "k-alpha")
    assert status == 200
    assert s["turns"] == 2 and s["max_turns"] == 8
    assert s["kv_bytes"] == kv_bytes and s["kv_warmth"] is True
    assert "tokens_budget_remaining" not in s  # k-alpha: unlimited, so omitted
    assert 0 < s["ttl_ms_remaining"] <= 600_000
    assert session(d, "s-view", "k-beta")[0] == 404  # another key's session is not visible
    status, _, _ = sync_request(d.host, d.port, "DELETE", "/v1/sessions/s-view", d.headers)
    assert status == 204
    assert session(d, "s-view", "k-alpha")[0] == 404


def test_turns_are_limited(budgets: Daemon) -> None:
    d = as_key(budgets, "k-alpha")
    for _ in range(8):
        assert submit(d, session_id="s-turns", max_tokens=1)[0] == 202
    status, body, _ = submit(d, session_id="s-turns", max_tokens=1)
    assert status == 400 and body["code"] == "INVALID_PARAMS" and "turns" in body["message"]


def test_token_budget_headers_and_refusal_before_enqueue(budgets: Daemon) -> None:
    d = as_key(budgets, "k-beta")
    status, body, headers = submit(d, session_id="s-beta", max_tokens=30)
    assert status == 202
    assert headers["x-budget-tokens-remaining"] == "70"  # 100 less this task's reservation
    with closing(stream(d, body["task_id"])) as s:
        assert s.headers["x-budget-tokens-remaining"] == "70"
        assert s.read_to_end()[-1].json["tokens_out"] == 30
    # The prompt was charged too, in the engine's own tokens.
    left = 70 - prompt_tokens(task_body()["prompt"])
    assert 0 < left < 70
    # (The end's report reaches the scheduler on the supervisor's line, the client's next
    # request on the frontend's: charged within moments of the end, wait for it.)
    wait_for(
        lambda: session(d, "s-beta", "k-beta")[1]["tokens_budget_remaining"] == left,
        10,
        "the task's tokens charged",
    )
    status, body, _ = submit(d, session_id="s-beta", max_tokens=left + 1)
    assert status == 429 and body["code"] == "BUDGET_EXHAUSTED"
    assert body["retriable"] is False and body["policy_label"] == "budget:tokens"
    status, body, headers = submit(d, session_id="s-beta", max_tokens=left)
    assert status == 202 and headers["x-budget-tokens-remaining"] == "0"
    assert session(d, "s-beta", "k-beta")[1]["tokens_budget_remaining"] == 0


def test_time_budget_ends_the_stream_with_reason_budget(budgets: Daemon) -> None:
    d = as_key(budgets, "k-gamma")
    status, body, headers = submit(d, session_id="s-gamma", max_tokens=1500)  # ~3 s of tokens
    assert status == 202 and headers["x-budget-time-remaining-ms"] == "300"
    assert headers["x-budget-cost-remaining"] == "250"  # 1000 less 1500 x 0.5 reserved
    events = read_all(d, body["task_id"], timeout=10)
    end = events[-1].json
    assert events[-1].event == "end" and end["reason"] == "budget"
    assert 0 < end["tokens_out"] < 1500
    wait_for(
        lambda: session(d, "s-gamma", "k-gamma")[1]["time_budget_remaining_ms"] <= 0,
        10,
        "the task's time charged",
    )
    status, body, _ = submit(d, session_id="s-gamma", max_tokens=1)
    assert status == 429 and body["policy_label"] == "budget:time"


def test_cost_budget_is_checked_before_enqueue(budgets: Daemon) -> None:
    d = as_key(budgets, "k-gamma")
    status, body, _ = submit(d, session_id="s-cost", max_tokens=2001)  # 1000.5 > 1000
    assert status == 429 and body["policy_label"] == "budget:cost"


def test_metrics_frames_are_interleaved(budgets: Daemon) -> None:
    d = as_key(budgets, "k-alpha")
    status, body, _ = submit(d, max_tokens=150, deadline_ms=60_000)  # ~300 ms of tokens
    events = read_all(d, body["task_id"])
    kinds = [e.event for e in events]
    assert kinds[0] == "started" and kinds[-1] == "end"
    metrics = [e.json for e in events if e.event == "metrics"]
    assert len(metrics) >= 2
    first_metrics = kinds.index("metrics")
    assert "token" in kinds[first_metrics + 1 :]  # interleaved, not appended
    m = metrics[-1]
    assert m["queue_depth"] >= 0 and 0.0 <= m["on_time_probability"] <= 1.0
    assert "tokens_budget_remaining" not in m and isinstance(m["kv_warmth"], bool)  # unlimited
    assert [int(e.id or -1) for e in events] == list(range(len(events)))
