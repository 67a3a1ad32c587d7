"""Bounded connections at a frontend (issue 13): idle and half-sent connections, header floods,
slow headers and bodies, and the connection cap, against a real frontend with small limits
(so each test is quick and costs few descriptors). ``perf/idle_conns.py`` runs the same idle
flood at any size against a running orchd."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.support.daemon import Daemon
from tests.support.sse import SyncStream, sync_request
from tests.support.tasks import task_body
from tests.support.wait import wait_for

LIMITS = """
[limits]
max_connections = 16
max_header_bytes = 4096
max_headers = 20
header_timeout_ms = 1000
body_timeout_ms = 1000
keepalive_timeout_ms = 1000

[[replicas]]
id = "r0"
slots = 64
[replicas.mock]
ttft_ms = 2
itl_ms = 5
"""
SLACK_S = 2.0  # a timer's deadline, plus a loaded machine's scheduling


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    # orchd starts under the common 1,024-descriptor limit (its frontend raises it only as
    # far as limits.max_connections needs), as in the report.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, 1024), hard))
    try:
        d = Daemon(Path(tmp_path_factory.mktemp("edge")), LIMITS).start()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield d
    finally:
        assert d.stop() == 0


@contextlib.contextmanager
def connections(d: Daemon, n: int) -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            socks.append(socket.create_connection((d.host, d.port), timeout=10))
        yield socks
    finally:
        for s in socks:
            s.close()


def read_all(s: socket.socket, timeout: float) -> bytes:
    """Everything until the server closes (ConnectionResetError is a failure: no resets)."""
    s.settimeout(timeout)
    buf = b""
    while chunk := s.recv(65536):
        buf += chunk
    return buf


def served(d: Daemon) -> bool:
    status, _, _ = sync_request(d.host, d.port, "GET", "/v1/capabilities", d.headers, timeout=5)
    return status == 200


def test_idle_connections_leave_new_clients_served(edge: Daemon) -> None:
    n = 2000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 256), hard))
    t0 = time.monotonic()
    with connections(edge, n) as idle:
        # Half of them start a request and stall mid-headers.
        for s in idle[::2]:
            with contextlib.suppress(OSError):  # (the oldest are closed already)
                s.sendall(b"GET /v1/capabilities HTTP/1.1\r\nHost: x\r\n")
        assert served(edge)
        assert served(edge)
    assert time.monotonic() - t0 < 30


def test_a_connection_that_sends_nothing_is_closed_within_the_header_timeout(
    edge: Daemon,
) -> None:
    with connections(edge, 1) as (s,):
        t0 = time.monotonic()
        assert read_all(s, 1.0 + SLACK_S) == b""
        assert time.monotonic() - t0 < 1.0 + SLACK_S


def test_slowloris_is_answered_408_within_the_header_timeout(edge: Daemon) -> None:
    with connections(edge, 1) as (s,):
        t0 = time.monotonic()
        s.sendall(b"GET /v1/capabilities HTTP/1.1\r\nHost: x\r\n")
        s.settimeout(0.2)
        got = b""
        with contextlib.suppress(OSError):
            while time.monotonic() - t0 < 1.0 + SLACK_S:
                s.sendall(b"X")  # one byte of a header line, every 200 ms
                with contextlib.suppress(TimeoutError):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    got += chunk
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert time.monotonic() - t0 < 1.0 + SLACK_S


def frontend_rss(d: Daemon) -> int:
    return int(d.find("orchd.frontend.main").memory_info().rss)


def test_a_header_flood_costs_no_more_than_the_header_limit(edge: Daemon) -> None:
    before = frontend_rss(edge)
    sent = 0
    with connections(edge, 1) as (s,):
        s.sendall(b"GET /v1/capabilities HTTP/1.1\r\nHost: x\r\nX-Flood: ")
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(32 * 16):  # 32 MiB, as the attack in the issue
                s.sendall(b"a" * 65536)
                sent += 65536
        with contextlib.suppress(ConnectionResetError):
            got = read_all(s, 5)
            assert got == b"" or got.startswith(b"HTTP/1.1 431 "), got[:100]
    assert sent < 16 << 20  # the frontend stopped reading long before the end
    assert frontend_rss(edge) - before < 8 << 20
    assert served(edge)


def test_headers_over_the_limit_get_431_with_the_envelope(edge: Daemon) -> None:
    for extra in (
        b"X-Big: " + b"a" * 5000 + b"\r\n",
        b"".join(b"X-H%d: v\r\n" % i for i in range(30)),
    ):
        with connections(edge, 1) as (s,):
            s.sendall(b"GET /v1/capabilities HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n")
            got = read_all(s, 5)
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431 ") and b"connection: close" in head
        assert json.loads(body)["code"] == "INVALID_PARAMS"


def test_a_body_that_does_not_arrive_in_time_gets_408(edge: Daemon) -> None:
    with connections(edge, 1) as (s,):
        t0 = time.monotonic()
        s.sendall(
            b"POST /v1/artifacts HTTP/1.1\r\nHost: x\r\nX-API-Key: dev\r\n"
            b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"kind"'
        )
        got = read_all(s, 1.0 + SLACK_S)
        assert got.startswith(b"HTTP/1.1 408 "), got
        assert b"body_timeout_ms" in got and time.monotonic() - t0 < 1.0 + SLACK_S


def test_an_idle_keep_alive_connection_is_closed(edge: Daemon) -> None:
    with connections(edge, 1) as (s,):
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        t0 = time.monotonic()
        got = read_all(s, 1.0 + SLACK_S + 1)
        assert got.startswith(b"HTTP/1.1 200 ") and time.monotonic() - t0 < 1.0 + SLACK_S + 1


def test_past_the_cap_with_every_connection_busy_a_new_client_gets_503(edge: Daemon) -> None:
    streams: list[SyncStream] = []
    try:
        for i in range(16):
            body = task_body(task_id=f"busy-{i}", max_tokens=20_000, deadline_ms=600_000)
            status, _, _ = sync_request(
                edge.host, edge.port, "POST", "/v1/tasks", edge.headers, body
            )
            assert status == 202
            streams.append(
                SyncStream(edge.host, edge.port, f"/v1/tasks/busy-{i}/stream", edge.headers)
            )
        with connections(edge, 1) as (s,):
            s.sendall(b"GET /v1/capabilities HTTP/1.1\r\nHost: x\r\nX-API-Key: dev\r\n\r\n")
            got = read_all(s, 5)  # the whole answer, then a clean close: no reset
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"connection: close" in head.lower()
        assert b"retry-after: 1" in head and b"max_connections" in body
    finally:
        for st in streams:
            st.close()  # a client that leaves cancels its task

    def answered_200() -> bool:
        with connections(edge, 1) as (s,):
            s.sendall(b"GET /v1/capabilities HTTP/1.1\r\nHost: x\r\nX-API-Key: dev\r\n\r\n")
            s.settimeout(5)
            return s.recv(65536).startswith(b"HTTP/1.1 200 ")

    wait_for(answered_200, 10, "the freed connections to serve new clients")


def test_an_open_file_limit_too_low_is_said_at_start(tmp_path: Path) -> None:
    hard = 4096  # orchd starts under this hard limit, whatever this machine's is
    cfg = f"[limits]\nmax_connections = {hard * 2}\n"
    with Daemon(tmp_path, cfg, nofile=(1024, hard)) as d:
        rec = d.wait_log(lambda r: "open-file limit" in str(r.get("msg", r)), 10)
        assert rec["needed"] > rec["open_files_limit"] and rec["max_connections"] < hard
        assert served(d)


def test_the_frontend_raises_its_open_file_limit(edge: Daemon) -> None:
    fe = edge.find("orchd.frontend.main")
    soft, _ = fe.rlimit(psutil.RLIMIT_NOFILE)
    assert soft >= 16 * 5 // 4 + 256


STALL = """
[limits]
stream_buffer_bytes = 65536
send_buffer_bytes = 8192
stall_timeout_ms = 3000

[[replicas]]
id = "r0"
[replicas.mock]
ttft_ms = 1
itl_ms = 0
"""


def metric(d: Daemon, name: str) -> float:
    _, _, raw = sync_request(d.host, d.port, "GET", "/metrics", {})
    for line in raw.decode().splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_a_client_that_stops_reading_is_cut_off_and_counted_until_closed(tmp_path: Path) -> None:
    with Daemon(tmp_path, STALL) as d:
        body = task_body(task_id="stall", max_tokens=30_000, deadline_ms=600_000)
        assert sync_request(d.host, d.port, "POST", "/v1/tasks", d.headers, body)[0] == 202
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect((d.host, d.port))
        try:
            s.sendall(b"GET /v1/tasks/stall/stream HTTP/1.1\r\nHost: x\r\nX-API-Key: dev\r\n\r\n")
            wait_for(lambda: metric(d, "frontend_stream_overflows_total") == 1, 30, "the cut")
            # Cut off, its end sent into full buffers: still open, and counted, ...
            assert metric(d, "frontend_streams_open") == 1
            # ... until the frontend closes its socket (limits.stall_timeout_ms).
            d.wait_log(lambda r: r.get("narration", "").startswith("closing the connection"), 30)
            wait_for(lambda: metric(d, "frontend_streams_open") == 0, 10, "the stream's close")
            got = 0
            with contextlib.suppress(ConnectionResetError):
                s.settimeout(5)
                while chunk := s.recv(65536):
                    got += len(chunk)
            # Held for the client: at most its stream buffer, the kernel buffers, and what
            # was in flight (far less than the 30,000 tokens of the task).
            assert got < 1 << 20
        finally:
            s.close()
