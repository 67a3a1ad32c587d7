"""Start and stop the processes a benchmark measures: orchd itself and the baselines."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any

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
    """``orchd serve`` as an operator runs it: its log goes to a file (as to journald), so
    the benchmark process spends nothing reading it while it measures."""

    def __init__(self, config_toml: str, frontends: int = 1) -> None:
        fd, self.config_path = tempfile.mkstemp(suffix=".toml")
        with os.fdopen(fd, "w") as f:
            f.write(config_toml)
        fd, self.log_path = tempfile.mkstemp(prefix="orchd-bench-", suffix=".log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHD_")}
        with os.fdopen(fd, "wb") as log_file:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "orchd.cli", "serve", "--config", self.config_path,
                 "--port", "0", "--frontends", str(frontends)],
                stderr=log_file, stdout=subprocess.DEVNULL, env=env,
            )  # fmt: skip
        self.port = 0
        deadline = time.monotonic() + 60
        while not self.port:
            ready = self._ready_line()
            if ready is not None:
                self.port = int(ready["url"].rsplit(":", 1)[1])
            elif self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "".join(self.log)
                raise RuntimeError(f"orchd did not become ready; its last words:\n{tail}")
            else:
                time.sleep(0.05)

    def _ready_line(self) -> dict[str, Any] | None:
        with open(self.log_path, "rb") as f:
            for raw in f:
                if b'"narration":"ready"' in raw:
                    rec: dict[str, Any] = json.loads(raw)
                    return rec
        return None

    @property
    def log(self) -> list[str]:
        """The last 30 lines orchd logged."""
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            return [ln.decode(errors="replace") for ln in deque(f, maxlen=30)]
        return []

    def processes(self) -> list[psutil.Process]:
        parent = psutil.Process(self.proc.pid)
        return [parent, *parent.children(recursive=True)]

    def roles(self, detailed: bool = False) -> dict[int, str]:
        """pid -> role; ``detailed`` numbers them: frontend0, supervisor1, engine1, ..."""
        out = {}
        for p in self.processes():
            try:
                argv = p.cmdline()
            except psutil.Error:
                continue
            cmd = " ".join(argv)
            for key, role in (
                ("orchd.frontend.main", "frontend"),
                ("orchd.scheduler.loop", "scheduler"),
                ("engine_procs.supervisor", "supervisor"),
                ("engine_procs.mock_engine", "engine"),
                ("engine_procs.torch_engine", "engine"),
                ("orchd.cli", "launcher"),
            ):
                if key in cmd:
                    if detailed and role in ("frontend", "supervisor"):
                        role += argv[-1]
                    elif detailed and role == "engine":
                        m = re.search(r"engine-(\d+)\.sock", cmd)
                        role += m.group(1) if m else "?"
                    out[p.pid] = role
        return out

    def rss(self, role: str) -> dict[int, int]:
        """pid -> resident bytes of the processes whose detailed role starts with ``role``."""
        out = {}
        for pid, r in self.roles(detailed=True).items():
            if r.startswith(role):
                with contextlib.suppress(psutil.Error):
                    out[pid] = psutil.Process(pid).memory_info().rss
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        os.unlink(self.config_path)
        with contextlib.suppress(OSError):
            os.unlink(self.log_path)


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


class CpuSampler:
    """CPU % of one core per role over a window (the load client's hooks call it)."""

    def __init__(self, o: Orchd | None, extra: dict[int, str] | None = None) -> None:
        self.roles = o.roles(detailed=True) if o else {}
        self.roles.update(extra or {})
        self.procs = [psutil.Process(p) for p in self.roles]
        self.t0 = self.t1 = 0.0
        self.c0: dict[int, float] = {}
        self.c1: dict[int, float] = {}

    def window_start(self) -> None:
        self.t0 = time.monotonic()
        self.c0 = cpu_seconds(self.procs)

    def window_end(self) -> None:
        self.t1 = time.monotonic()
        self.c1 = cpu_seconds(self.procs)

    def tick(self, now: float) -> None:
        pass

    def by_role(self) -> dict[str, float]:
        wall = self.t1 - self.t0
        out: dict[str, float] = {}
        for pid, role in self.roles.items():
            used = self.c1.get(pid, 0.0) - self.c0.get(pid, 0.0)
            out[role] = out.get(role, 0.0) + (100.0 * used / wall if wall > 0 else 0.0)
        return {k: round(v, 2) for k, v in sorted(out.items())}

    def total(self) -> float:
        return round(sum(self.by_role().values()), 2)


def cpu_seconds(procs: list[psutil.Process]) -> dict[int, float]:
    out = {}
    for p in procs:
        try:
            t = p.cpu_times()
            out[p.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return out


# ------------------------------------------------------------------------------ configs


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``extra`` over ``base``, tables merged key by key. A ``replica`` table in ``extra``
    (not part of orchd's config) is merged into every ``[[replicas]]`` entry."""
    out = dict(base)
    for k, v in extra.items():
        if k == "replica" and isinstance(v, dict):
            out["replicas"] = [merge(r, v) for r in out.get("replicas", [])]
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")


def _table(name: str, d: dict[str, Any], array: bool = False) -> list[str]:
    lines = [f"[[{name}]]" if array else f"[{name}]"]
    subs = []
    for k, v in d.items():
        if isinstance(v, dict):
            subs.append((k, v))
        else:
            lines.append(f"{k} = {_value(v)}")
    for k, v in subs:
        lines += _table(f"{name}.{k}", v)
    return lines


def to_toml(cfg: dict[str, Any]) -> str:
    """The subset of TOML orchd's config uses: tables, an array of tables, scalars, lists."""
    lines: list[str] = []
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines += _table(k, v)
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            for item in v:
                lines += _table(k, item, array=True)
        else:
            lines.insert(0, f"{k} = {_value(v)}")
    return "\n".join(lines) + "\n"


def orchd_config(
    replicas: int,
    slots: int,
    mock: dict[str, Any],
    extra: dict[str, Any] | None = None,
    **limits: Any,
) -> str:
    """An orchd config for a scenario: ``replicas`` mock replicas, then ``extra`` on top."""
    cfg: dict[str, Any] = {
        "server": {"drain_deadline_ms": 2000},
        "limits": {"queue_capacity": 4096, **limits},
        "replicas": [
            {"id": f"r{i}", "slots": slots, "decode_timeout_ms": 600_000, "mock": dict(mock)}
            for i in range(replicas)
        ],
    }
    return to_toml(merge(cfg, extra or {}))
