"""Logs of a real orchd: an access line per request (refusals too, at the app and at the edge),
the request's correlation id on every process's lines about its task, the key never logged,
and human-readable lines when stderr is a terminal."""

from __future__ import annotations

import os
import pty
import re
import select
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.daemon import Daemon
from tests.support.sse import SyncStream, sync_request
from tests.support.tasks import task_body
from tests.support.wait import wait_for

SECRET = "sekrit-key-4f1d9a"
CONFIG = f"""
[server]
api_keys = ["{SECRET}"]

[limits]
max_body_bytes = 4096
max_streams_per_key = 1
max_header_bytes = 2048

[[replicas]]
id = "r0"
[replicas.mock]
ttft_ms = 2
itl_ms = 20
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("logs"), CONFIG, key=SECRET) as d:
        yield d


def access(d: Daemon, **want: Any) -> dict[str, Any]:
    return d.wait_log(
        lambda r: r.get("narration") == "access" and all(r.get(k) == v for k, v in want.items()),
        10.0,
    )


def test_a_task_s_lines_carry_its_correlation_id_in_every_process(daemon: Daemon) -> None:
    cid = "cid-task-lines-1"
    body = task_body(task_id="t-logs-1", max_tokens=3)
    headers = {**daemon.headers, "X-Correlation-Id": cid}
    status, _, _ = sync_request(daemon.host, daemon.port, "POST", "/v1/tasks", headers, body)
    assert status == 202
    s = SyncStream(daemon.host, daemon.port, "/v1/tasks/t-logs-1/stream", daemon.headers)
    s.read_to_end()
    s.close()
    line = access(daemon, cid=cid)
    assert (line["method"], line["path"], line["status"]) == ("POST", "/v1/tasks", 202)
    assert line["task_id"] == "t-logs-1"
    assert line["component"] == "frontend-0" and line["duration_ms"] >= 0
    assert len(line["key_id"]) == 12 and line["key_id"] not in SECRET
    # The scheduler's admission and the supervisor's end of that task, in other processes.
    for component, narration in (("scheduler", "admitted"), ("supervisor-r0", "stream ended")):
        rec = daemon.wait_log(
            lambda r, c=component, n=narration: (
                r.get("component") == c
                and r.get("narration") == n
                and str(r.get("task_id", "")).endswith("/t-logs-1")
            ),
            10.0,
        )
        assert rec["cid"] == cid, rec
    # The stream's own request has its own id, and names the task.
    stream_line = access(daemon, path="/v1/tasks/t-logs-1/stream")
    assert stream_line["status"] == 200 and stream_line["task_id"] == "t-logs-1"
    assert stream_line["cid"] != cid


def test_refusals_are_logged_and_the_key_never_is(daemon: Daemon) -> None:
    host, port = daemon.host, daemon.port
    h = daemon.headers

    def req(method: str, path: str, headers: dict[str, str], body: Any, cid: str) -> int:
        hdrs = {**headers, "X-Correlation-Id": cid}
        return sync_request(host, port, method, path, hdrs, body)[0]

    assert req("POST", "/v1/tasks", {}, task_body(), "cid-401") == 401
    assert req("POST", "/v1/tasks", {"X-API-Key": "wrong"}, task_body(), "cid-403") == 403
    assert req("GET", "/v1/tasks/t-nobody/stream", h, None, "cid-404") == 404
    assert req("POST", "/v1/tasks", h, {"task_id": "t-x"}, "cid-400") == 400
    assert req("POST", "/v1/tasks", h, task_body(prompt="x" * 8000), "cid-413") == 413
    # 429: this key may hold one stream per frontend.
    status, _, _ = sync_request(
        host, port, "POST", "/v1/tasks", h, task_body(task_id="t-long", max_tokens=1000)
    )
    assert status == 202
    held = SyncStream(host, port, "/v1/tasks/t-long/stream", h)
    try:
        assert req("GET", "/v1/tasks/t-long/stream", h, None, "cid-429") == 429
    finally:
        held.close()
    for code in (401, 403, 404, 400, 413, 429):
        line = access(daemon, cid=f"cid-{code}")
        assert line["status"] == code, line
    assert access(daemon, cid="cid-401")["key_id"] == ""
    assert access(daemon, cid="cid-404")["task_id"] == "t-nobody"
    assert not any(SECRET in line for line in daemon.raw), "an API key reached the log"


def test_an_answer_from_the_edge_is_logged(daemon: Daemon) -> None:
    """431: headers past limits.max_header_bytes, answered by the edge before any app."""
    with socket.create_connection((daemon.host, daemon.port), timeout=10) as s:
        s.sendall(b"GET /v1/capabilities HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 4096)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 431")
    cid = next(
        line.split(b":", 1)[1].strip().decode()
        for line in answer.split(b"\r\n")
        if line.lower().startswith(b"x-correlation-id:")
    )
    line = access(daemon, cid=cid)
    assert (line["status"], line["refused_by"], line["path"]) == (431, "edge", "/v1/capabilities")


def test_logs_on_a_terminal_are_human_readable(tmp_path: Path) -> None:
    """stderr a terminal (a pty): text lines, not JSON; the ready line says where."""
    config = tmp_path / "orchd.toml"
    config.write_text('[[replicas]]\nid = "r0"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHD_")}
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchd.cli", "serve", "--config", str(config), "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
        env=env,
        start_new_session=True,
    )
    os.close(slave)
    out = b""
    try:

        def ready() -> bool:
            nonlocal out
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    return True
            return b"launcher  ready" in out

        wait_for(ready, 60.0, "the ready line on the terminal")
    finally:
        proc.terminate()
        proc.wait(60)
        os.close(master)
    lines = out.decode(errors="replace").splitlines()
    ready_line = next(line for line in lines if "launcher  ready" in line)
    assert not ready_line.lstrip().startswith("{")
    assert re.match(
        r"\d\d:\d\d:\d\d\.\d{3} INFO +launcher  ready  url=http://127\.0\.0\.1:", ready_line
    )
