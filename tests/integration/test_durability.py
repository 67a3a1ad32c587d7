"""Nothing accepted is lost (issue 12, failure 6): a scheduler killed mid-stream leaves every
stream running to its end with no gap and every queued task queued; a whole orchd stopped
(or killed) and started again on the same state directory runs the tasks it had accepted,
finds their streams, and keeps its sessions' turns and budgets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psutil

from tests.integration.conftest import stream, submit
from tests.support.daemon import Daemon
from tests.support.sse import Event, SyncStream, sync_request
from tests.support.wait import wait_for

# One slot: a long task runs, the others wait in the queue.
ONE_SLOT = """
[server]
restart_backoff_ms = 100
heartbeat_ms = 300
drain_deadline_ms = 300
state_dir = "{state}"

[sessions.session_budget]
tokens = 10000

[[replicas]]
id = "r0"
slots = 1
[replicas.mock]
itl_ms = {itl}
"""


def config(tmp: Path, itl: int = 3) -> str:
    return ONE_SLOT.format(state=tmp / "state", itl=itl)


def tokens(events: list[Event]) -> list[int]:
    return [e.json["i"] for e in events if e.event == "token"]


def terminals(events: list[Event]) -> list[Event]:
    return [e for e in events if e.event in ("end", "error")]


def complete(events: list[Event], n: int) -> None:
    """The whole stream: started, tokens 0..n-1 with no gap, one `end` (reason length)."""
    assert events[0].event == "started"
    assert tokens(events) == list(range(n))
    ends = terminals(events)
    assert [e.event for e in ends] == ["end"] and ends[0].json["reason"] == "length", ends


def session(d: Daemon, sid: str) -> dict[str, Any]:
    status, _, raw = sync_request(d.host, d.port, "GET", f"/v1/sessions/{sid}", d.headers)
    assert status == 200, raw
    return dict(json.loads(raw))


def admit(d: Daemon, **over: Any) -> str:
    status, body, _ = submit(d, **over)
    assert status == 202, body
    return str(body["task_id"])


def pids(d: Daemon) -> dict[str, int]:
    out = {}
    for c in d.children():
        try:
            cmd = c.cmdline()
        except psutil.NoSuchProcess:
            continue
        for mod in ("orchd.scheduler.loop", "engine_procs.supervisor", "orchd.frontend.main"):
            if mod in cmd:
                out[mod] = c.pid
    return out


def test_a_scheduler_killed_mid_stream_cuts_no_stream_and_loses_no_task(tmp_path: Path) -> None:
    with Daemon(tmp_path, config(tmp_path)) as d:
        before = pids(d)
        long_id = admit(d, max_tokens=600, session_id="s-kept")  # ~2 s at 3 ms a token
        live = stream(d, long_id)
        live.read_until(lambda s: len(tokens(s.events)) >= 20)
        waiting_id = admit(d, max_tokens=40)  # queued behind it, its stream open
        waiting = stream(d, waiting_id)
        later_id = admit(d, max_tokens=30)  # queued, nobody streams it yet
        left = session(d, "s-kept")["tokens_budget_remaining"]

        psutil.Process(before["orchd.scheduler.loop"]).kill()

        complete(live.read_to_end(30), 600)  # through the restart, no gap, one end
        complete(waiting.read_to_end(30), 40)
        again = stream(d, later_id)
        assert again.status == 200, again.body
        complete(again.read_to_end(30), 30)
        for s in (live, waiting, again):
            s.close()
        after = pids(d)
        assert after["orchd.scheduler.loop"] != before["orchd.scheduler.loop"]
        # Only the scheduler restarted: the supervisor and frontend streamed on.
        for mod in ("engine_procs.supervisor", "orchd.frontend.main"):
            assert after[mod] == before[mod]
        assert d.count_log(lambda r: r.get("narration") == "tasks re-announced") >= 1
        # The session's reservation survived and was charged once the task ended.
        wait_for(
            lambda: session(d, "s-kept")["tokens_budget_remaining"] < left,
            10,
            "the session to be charged for the adopted task",
        )


def test_a_stopped_orchd_runs_its_queued_tasks_and_keeps_sessions(tmp_path: Path) -> None:
    d = Daemon(tmp_path, config(tmp_path, itl=5)).start()
    try:
        done_id = admit(d, max_tokens=10, session_id="s-budget")
        s = stream(d, done_id)
        complete(s.read_to_end(), 10)
        s.close()
        wait_for(
            lambda: (
                session(d, "s-budget")["turns"] == 1
                and session(d, "s-budget")["tokens_budget_remaining"] < 10000
            ),
            10,
            "the session charged",
        )
        kept = session(d, "s-budget")
        running_id = admit(d, max_tokens=5000)  # runs past the drain deadline
        live = stream(d, running_id)
        live.read_until(lambda st: len(tokens(st.events)) >= 5)
        queued = [admit(d, max_tokens=20, session_id="s-budget") for _ in range(2)]
        queued.append(admit(d, max_tokens=20))
        assert d.stop() == 0  # SIGTERM; the drain deadline passes with tasks queued
        live.close()
    finally:
        d.kill_tree()
    with Daemon(tmp_path, config(tmp_path, itl=5)) as d2:
        assert d2.count_log(lambda r: r.get("narration") == "journal replayed") == 1
        view = session(d2, "s-budget")
        # The same session: its turns (the charged one and the two still queued) and budget.
        assert view["turns"] == kept["turns"] + 2
        # Less the two queued turns' reservations (20 each), and their prompts' 2 tokens each
        # if they already ran: nothing was given back or charged twice.
        left = kept["tokens_budget_remaining"] - 40
        assert left - 4 <= view["tokens_budget_remaining"] <= left
        for tid in queued:
            st = stream(d2, tid)
            assert st.status == 200, st.body
            complete(st.read_to_end(), 20)
            st.close()
        # The task the drain stopped says so, retriably, instead of a 404.
        st = stream(d2, running_id)
        assert st.status == 200, st.body
        ends = terminals(st.read_to_end())
        st.close()
        assert [e.json["code"] for e in ends] == ["POOL_UNAVAILABLE"]
        assert ends[0].json["retriable"] is True
        wait_for(
            lambda: (
                session(d2, "s-budget")["tokens_budget_remaining"] < kept["tokens_budget_remaining"]
            ),
            10,
            "the queued turns charged after the restart",
        )


def test_a_killed_orchd_ends_the_running_task_retriably_and_runs_the_queued(
    tmp_path: Path,
) -> None:
    d = Daemon(tmp_path, config(tmp_path)).start()
    try:
        running_id = admit(d, max_tokens=5000)
        live = stream(d, running_id)
        live.read_until(lambda st: len(tokens(st.events)) >= 5)
        queued_id = admit(d, max_tokens=25)
    finally:
        d.kill_tree()  # every process at once, as a power cut or an OOM kill of the tree
        d.stop()
    live.close()
    with Daemon(tmp_path, config(tmp_path)) as d2:
        st = stream(d2, queued_id)
        assert st.status == 200, st.body
        complete(st.read_to_end(), 25)
        st.close()
        st = stream(d2, running_id)
        assert st.status == 200, st.body
        ends = terminals(st.read_to_end())
        st.close()
        assert [e.json["code"] for e in ends] == ["WORKER_RESET"]
        assert ends[0].json["retriable"] is True
        SyncStream.close_all()
