"""Start and stop the processes a benchmark measures: orchd itself and the baselines."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {port}")


class Orchd:
    def __init__(self, config_toml: str, frontends: int = 1) -> None:
        fd, self.config_path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(config_toml)
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHD_")}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "orchd.cli", "serve", "--config", self.config_path,
             "--port", "0", "--frontends", str(frontends)],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env,
        )  # fmt: skip
        self.port = 0
        self._ready = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        if not self._ready.wait(60):
            self.stop()
            raise RuntimeError("orchd did not become ready")

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("narration") == "ready":
                self.port = int(rec["url"].rsplit(":", 1)[1])
                self._ready.set()

    def processes(self) -> list[psutil.Process]:
        parent = psutil.Process(self.proc.pid)
        return [parent, *parent.children(recursive=True)]

    def roles(self) -> dict[int, str]:
        out = {}
        for p in self.processes():
            cmd = " ".join(p.cmdline())
            for key, role in (
                ("orchd.frontend.main", "frontend"),
                ("orchd.scheduler.loop", "scheduler"),
                ("engine_procs.supervisor", "supervisor"),
                ("engine_procs.mock_engine", "engine"),
                ("orchd.cli", "launcher"),
            ):
                if key in cmd:
                    out[p.pid] = role
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        os.unlink(self.config_path)


class Ceiling:
    def __init__(self) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perf.ceiling", "--port", str(self.port)],
            stdout=subprocess.DEVNULL,
        )
        wait_port(self.port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out
