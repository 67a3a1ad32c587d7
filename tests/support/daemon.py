"""Start ``orchd serve`` as a user would (a real process tree on a free loopback port)."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from ipc.proc import die_with_parent

READY_TIMEOUT_S = 60.0


def _cmdline(p: psutil.Process) -> list[str]:
    try:
        return p.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


class Daemon:
    def __init__(
        self,
        workdir: Path,
        config_toml: str = "",
        *,
        frontends: int = 1,
        env: dict[str, str] | None = None,
        key: str = "dev",
        port: int = 0,
        nofile: tuple[int, int] | None = None,
    ) -> None:
        self.want_port = port  # 0: any free port
        self.nofile = nofile  # the open-file limit (soft, hard) orchd starts under
        self.workdir = workdir
        self.config_path = workdir / "orchd.toml"
        self.config_path.write_text(config_toml)
        self.frontends = frontends
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env.pop("ORCHD_CONFIG", None)
        # The test run's own switch (tests/integration/test_ui.py), not orchd's: orchd refuses
        # an ORCHD_* variable it does not know.
        self.env.pop("ORCHD_ARTIFACTS", None)
        self.key = key
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self._cv = threading.Condition()
        self.host = "127.0.0.1"
        self.port = 0
        self.run_dir = ""

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> Daemon:
        cmd = [
            sys.executable, "-m", "orchd.cli", "serve",
            "--config", str(self.config_path),
            "--port", str(self.want_port),
            "--frontends", str(self.frontends),
        ]  # fmt: skip
        self.proc = subprocess.Popen(
            cmd,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            env=self.env,
            preexec_fn=self._preexec,  # a killed test run leaves no daemon behind
        )
        self.read_log()
        try:
            ready = self.wait_log(lambda r: r.get("narration") == "ready", READY_TIMEOUT_S)
        except BaseException:
            self.kill_tree()  # it never came up: leave no process or open pipe behind
            self.proc.wait(10)
            self._close_stderr()
            raise
        url = ready["url"]
        self.port = int(url.rsplit(":", 1)[1])
        self.run_dir = ready["run_dir"]
        return self

    def restart_after_kill(self, timeout: float = 30.0) -> Daemon:
        """After the launcher died by SIGKILL: reap it, wait until its children have followed
        it (they die with their parent), then start orchd again on the same port and config,
        as systemd's ``Restart=`` would."""
        assert self.proc is not None
        self.proc.wait(timeout)
        self._close_stderr()
        deadline = time.monotonic() + timeout
        while any(self.run_dir in " ".join(_cmdline(p)) for p in psutil.process_iter()):
            if time.monotonic() > deadline:
                raise TimeoutError("children of the killed launcher are still running")
            time.sleep(0.05)
        self.want_port = self.port
        with self._cv:
            self.lines, self.raw = [], []
        return self.start()

    def _preexec(self) -> None:
        if self.nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, self.nofile)
        die_with_parent()

    def read_log(self) -> None:
        """Read the process's log lines as they come, in a thread."""
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cv:
                self.raw.append(line)
                with contextlib.suppress(ValueError):
                    self.lines.append(json.loads(line))
                self._cv.notify_all()

    def wait_log(self, pred: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cv:
            while True:
                for rec in self.lines[seen:]:
                    if pred(rec):
                        return rec
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if left <= 0:
                    tail = "\n".join(self.raw[-40:])
                    raise TimeoutError(
                        f"no matching log line within {timeout}s; last lines:\n{tail}"
                    )
                if self.proc is not None and self.proc.poll() is not None:
                    tail = "\n".join(self.raw[-40:])
                    raise RuntimeError(f"orchd exited with {self.proc.returncode}:\n{tail}")
                self._cv.wait(min(left, 0.5))

    def count_log(self, pred: Callable[[dict[str, Any]], bool]) -> int:
        with self._cv:
            return sum(1 for r in self.lines if pred(r))

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stopped as an operator stops it (SIGTERM): it must drain and exit 0."""
        assert self.stop() == 0

    def stop(self, timeout: float = 60.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill_tree()
            raise
        self._close_stderr()
        return code

    def _close_stderr(self) -> None:
        """Once the process has exited, its log pipe reaches its end: read it, close it."""
        assert self.proc is not None
        self._reader.join(5.0)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()

    def kill_tree(self) -> None:
        if self.proc is None:
            return
        try:
            parent = psutil.Process(self.proc.pid)
            procs = [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()

    # ---------------------------------------------------------------- looking inside

    def children(self) -> list[psutil.Process]:
        assert self.proc is not None
        return psutil.Process(self.proc.pid).children(recursive=True)

    def find(self, module: str, arg: str | None = None) -> psutil.Process:
        """The live child running ``python -m module`` (with ``arg`` among its args)."""
        for c in self.children():
            try:
                cmd = c.cmdline()
            except psutil.NoSuchProcess:
                continue
            if module in cmd and (arg is None or arg in cmd):
                return c
        raise LookupError(f"no child runs {module} {arg or ''}")

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"X-API-Key": self.key}
