"""SIGTERM drains and leaves nothing behind; start-up refuses what it must."""

from __future__ import annotations

import json
import os
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
