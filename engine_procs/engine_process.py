"""An engine server process owned by a supervisor, and the policy for restarting it.

When a replica's ``endpoint.command`` is set, its adapter starts that command (``{model_path}``,
``{port}``, ``{model}`` substituted) in its own session, so stopping it stops everything the
engine spawned; the kernel kills it if the supervisor dies (``die_with_parent``). It inherits
the supervisor's environment, where the launcher already set ``CUDA_VISIBLE_DEVICES`` to the
replica's devices. Its output goes to a log file; the last lines are kept for ``last_error``.

Its restart rules (backoff and circuit breaker) are :class:`orchd.core.restart.RestartPolicy`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
from collections import deque

from ipc.proc import die_with_parent

STOP_GRACE_S = 10.0
TAIL_LINES = 12


def free_port() -> int:
    """A loopback port free right now (the engine binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def render_command(template: list[str], *, model_path: str, port: int, model: str) -> list[str]:
    values = {"model_path": model_path, "port": str(port), "model": model}
    out = []
    for arg in template:
        for key, value in values.items():
            arg = arg.replace("{" + key + "}", value)
        out.append(arg)
    return out


class EngineProcess:
    """One engine server process: start, watch (``wait``), stop (TERM, then KILL)."""

    def __init__(self, argv: list[str], log_path: str | None = None) -> None:
        if not argv:
            raise ValueError("empty engine command")
        self.argv = argv
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self._pump: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                preexec_fn=die_with_parent,
                start_new_session=True,
            )
        except OSError as e:
            raise RuntimeError(f"cannot start engine {self.argv[0]!r}: {e.strerror or e}") from e
        self._pump = asyncio.get_running_loop().create_task(self._read_output())

    async def _read_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        log = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115
        partial = b""
        try:
            while chunk := await self.proc.stdout.read(65536):
                if log is not None:
                    log.write(chunk)
                    log.flush()
                *lines, partial = (partial + chunk).split(b"\n")
                partial = partial[-4096:]
                self.tail.extend(ln.decode(errors="replace").rstrip()[:500] for ln in lines)
            if partial:
                self.tail.append(partial.decode(errors="replace").rstrip()[:500])
        finally:
            if log is not None:
                log.close()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode if self.proc is not None else None

    def tail_text(self) -> str:
        lines = [ln for ln in self.tail if ln]
        return "; last output: " + " | ".join(lines[-4:]) if lines else ""

    async def wait(self) -> int:
        assert self.proc is not None
        code = await self.proc.wait()
        if self._pump is not None:  # take the last words before anyone reads the tail
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._pump), 1.0)
        return code

    async def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.returncode is None:
            self._signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace_s)
            except TimeoutError:
                self._signal(signal.SIGKILL)
                await proc.wait()
        self._signal(signal.SIGKILL)  # whatever the engine left behind in its session
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump

    def _signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)
