"""SIGTERM drains and leaves nothing behind; start-up refuses what it must."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

from tests.integration.conftest import stream, submit
from tests.support.daemon import Daemon

SLOW = """
[server]
drain_deadline_ms = 20000

[[replicas]]
id = "r0"
[replicas.mock]
itl_ms = 5
"""


def test_sigterm_drains_and_leaves_no_process_segment_or_socket(tmp_path: Path) -> None:
    d = Daemon(tmp_path, SLOW).start()
    tag = json.loads(Path(d.run_dir, "config.json").read_bytes())["runtime"]["tag"]
    segments = [f for f in os.listdir("/dev/shm") if f.startswith(f"orchd-{tag}")]
    assert segments, "the rings live in /dev/shm while orchd runs"
    sockets = [f for f in os.listdir(d.run_dir) if f.endswith((".sock", ".bell"))]
    assert sockets
    pids = [c.pid for c in d.children()]
    assert len(pids) >= 4  # scheduler, supervisor, engine, frontend

    status, body, _ = submit(d, max_tokens=300)  # ~1.5 s of tokens
    s = stream(d, body["task_id"])
    s.read_until(lambda st: len(st.events) >= 3)
    assert d.proc is not None
    d.proc.terminate()
    d.wait_log(lambda r: r.get("narration") == "draining: admission closed", 10)
    status, refused, _ = submit(d, max_tokens=3)
    assert status == 503 and refused["code"] == "POOL_UNAVAILABLE"
    events = s.read_to_end(timeout=30)  # the running stream finishes during the drain
    assert events[-1].event == "end" and events[-1].json["tokens_out"] == 300

    assert d.stop(30) == 0  # (already stopping: this only waits, and closes its log)
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"orchd-{tag}")]
    assert not os.path.exists(d.run_dir)


def test_refuses_non_loopback_without_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHD_")}
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "orchd.cli", "serve", "--host", "0.0.0.0", "--port", "0"],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert b"no API keys" in r.stderr
    assert time.monotonic() - t0 < 30


def test_bad_config_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[limits]\nring_bytes = 1000\n")
    r = subprocess.run(
        [sys.executable, "-m", "orchd.cli", "serve", "--config", str(cfg), "--port", "0"],
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 2
    assert b"ring_bytes" in r.stderr


def test_restarts_on_its_own_port_at_once(tmp_path: Path) -> None:
    """A clean stop leaves the server's side of closed connections in TIME-WAIT; the next
    orchd on the same port must start at once all the same (a systemd restart, a deploy)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = Daemon(tmp_path / "a", port=port).start()
    # While it serves, a second orchd on its port is refused (no sharing by SO_REUSEPORT).
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHD_")}
    r = subprocess.run(
        [sys.executable, "-m", "orchd.cli", "serve", "--port", str(port)],
        env=env,
        capture_output=True,
        timeout=30,
    )
    assert r.returncode == 2 and b"cannot bind" in r.stderr
    client = socket.create_connection(("127.0.0.1", port))
    # A small answer, read whole: a close with unread bytes would send RST, not FIN, and leave
    # no TIME-WAIT behind (the /metrics text outgrew one read).
    client.sendall(b"GET /healthz HTTP/1.1\r\nHost: orchd\r\n\r\n")
    answer = b""
    while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
        answer += client.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")
    assert first.stop() == 0  # it closes the kept-alive connection first: TIME-WAIT
    client.close()
    waiting = [
        c
        for c in psutil.net_connections("tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_TIME_WAIT
    ]
    assert waiting, "the test needs a TIME-WAIT socket on the port"
    second = Daemon(tmp_path / "b", port=port).start()
    assert second.port == port
    assert second.stop() == 0
