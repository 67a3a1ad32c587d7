"""Ctrl-C on a real orchd: the first SIGINT drains and says how to stop at once; a second one
kills every child and exits 130, leaving no process, ring or socket behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import psutil

from tests.support.daemon import Daemon
from tests.support.sse import SyncStream, sync_request
from tests.support.tasks import task_body
from tests.support.wait import wait_for

# A slow stream and a long drain deadline: after one Ctrl-C orchd keeps draining for minutes.
SLOW = """
[server]
drain_deadline_ms = 120000

[[replicas]]
id = "r0"
[replicas.mock]
ttft_ms = 2
itl_ms = 50
"""


def test_a_second_ctrl_c_exits_at_once(tmp_path: Path) -> None:
    d = Daemon(tmp_path, SLOW).start()
    assert d.proc is not None
    children = d.children()
    assert len(children) >= 3
    body = task_body(max_tokens=1000, deadline_ms=120_000)
    status, _, _ = sync_request(d.host, d.port, "POST", "/v1/tasks", d.headers, body)
    assert status == 202
    s = SyncStream(d.host, d.port, f"/v1/tasks/{body['task_id']}/stream", d.headers)
    s.read_until(lambda st: any(e.event == "token" for e in st.events))
    try:
        d.proc.send_signal(signal.SIGINT)
        d.wait_log(lambda r: str(r.get("narration", "")).startswith("draining"), 30.0)
        wait_for(
            lambda: any("draining; press Ctrl-C again to exit now" in x for x in d.raw),
            10.0,
            "the first Ctrl-C's notice on stderr",
        )
        assert d.proc.poll() is None  # the open stream keeps it draining
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGINT)
        code = d.proc.wait(15)
        took = time.monotonic() - t0
    finally:
        s.close()
        if d.proc.poll() is None:
            d.kill_tree()
    assert code == 130
    assert took < 10.0, took
    d._close_stderr()  # its log pipe has reached its end: read to the end, closed
    assert d.count_log(lambda r: str(r.get("narration", "")).startswith("forced exit")) == 1
    for c in children:
        assert not psutil.pid_exists(c.pid) or c.status() == psutil.STATUS_ZOMBIE, c
    tag = f"orchd-{d.proc.pid}-"
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(tag)]
    assert not os.path.exists(d.run_dir)
