"""The chaos harness: a live orchd, streams followed by clients that resume, and one fault.

A *fault* is a signal to one process of the tree: SIGKILL, or SIGSTOP held past the heartbeat
limit and then SIGCONT. A :class:`Follower` is what a well-behaved SSE client does (the
EventSource rules of the HTML standard, section 9.2): when its connection drops before a
terminal event, it reconnects with ``Last-Event-ID`` set to the last id it saw. The properties
the issue asks of every fault are checked by :func:`check_streams` and :func:`leftovers`.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

import psutil

from tests.support.daemon import Daemon
from tests.support.sse import Event, SyncStream, sync_request
from tests.support.tasks import task_body

Target = Literal["engine", "supervisor", "frontend", "scheduler", "launcher"]
Kind = Literal["kill", "pause"]
TERMINAL = ("end", "error")


def process_of(d: Daemon, target: Target) -> psutil.Process:
    """The process a fault hits: replica 0's supervisor or its engine, frontend 0, ..."""
    if target == "launcher":
        assert d.proc is not None
        return psutil.Process(d.proc.pid)
    if target == "scheduler":
        return d.find("orchd.scheduler.loop")
    if target == "frontend":
        return d.find("orchd.frontend.main", "0")
    sup = d.find("engine_procs.supervisor", "0")
    if target == "supervisor":
        return sup
    (engine,) = [c for c in sup.children() if "engine_procs.mock_engine" in c.cmdline()]
    return engine


def inject(proc: psutil.Process, kind: Kind, pause_s: float) -> None:
    """SIGKILL, or SIGSTOP for ``pause_s`` then SIGCONT (the caller's thread waits it out)."""
    if kind == "kill":
        proc.send_signal(signal.SIGKILL)
        return
    proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(pause_s)  # the fault itself: a process frozen for this long
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGCONT)


@dataclass
class Follower:
    """One client following one task's stream to its terminal event, resuming on drops."""

    d: Daemon
    task_id: str
    events: list[Event] = field(default_factory=list)
    reconnects: int = 0
    statuses: list[int] = field(default_factory=list)
    ended_at: float | None = None
    error: str = ""

    def run(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not self.terminal():
            headers = dict(self.d.headers)
            last = self.last_id()
            if last is not None:
                headers["Last-Event-ID"] = last
            try:
                s = SyncStream(
                    self.d.host, self.d.port, f"/v1/tasks/{self.task_id}/stream", headers
                )
            except OSError:
                time.sleep(0.05)  # nobody listens yet (a restart): retry, as EventSource does
                continue
            self.statuses.append(s.status)
            if s.status != 200:
                s.close()
                if s.status in (404, 400):
                    self.error = f"GET stream answered {s.status}: {s.body[:200]!r}"
                    return
                time.sleep(0.05)  # 409/503: the old connection is still being fenced
                continue
            try:
                s.read_until(lambda st: any(e.event in TERMINAL for e in st.events),
                             timeout=max(0.1, deadline - time.monotonic()))  # fmt: skip
            except (OSError, TimeoutError):
                pass
            finally:
                self.events += s.events
                s.close()
            if self.terminal():
                self.ended_at = time.monotonic()
            else:
                self.reconnects += 1

    def last_id(self) -> str | None:
        for e in reversed(self.events):
            if e.id is not None:
                return e.id
        return None

    def terminal(self) -> list[Event]:
        return [e for e in self.events if e.event in TERMINAL]

    def token_indices(self) -> list[int]:
        return [e.json["i"] for e in self.events if e.event == "token"]


@dataclass
class Following:
    """Followers running in threads (one each), so a fault lands while all of them read."""

    followers: list[Follower]
    threads: list[threading.Thread]

    def join(self) -> list[Follower]:
        for t in self.threads:
            t.join()
        return self.followers


def follow(d: Daemon, task_ids: list[str], timeout: float) -> Following:
    fs = [Follower(d, t) for t in task_ids]
    threads = [threading.Thread(target=f.run, args=(timeout,), daemon=True) for f in fs]
    for t in threads:
        t.start()
    return Following(fs, threads)


def submit(d: Daemon, max_tokens: int, **over: object) -> str:
    body = task_body(max_tokens=max_tokens, **over)
    deadline = time.monotonic() + 30
    while True:
        try:
            status, _, raw = sync_request(d.host, d.port, "POST", "/v1/tasks", d.headers, body)
        except OSError:
            status, raw = 0, b""
        if status == 202:
            return str(json.loads(raw)["task_id"])
        if time.monotonic() > deadline:
            raise AssertionError(f"submit answered {status}: {raw[:300]!r}")
        time.sleep(0.05)


def check_streams(fs: list[Follower], want_tokens: int) -> dict[str, int]:
    """Each stream: exactly one terminal, last; ids strictly increasing across resumes; token
    indices 0..n-1 with no gap or repeat; an error is retriable. Returns outcome counts."""
    outcomes: dict[str, int] = {}
    for f in fs:
        assert not f.error, f"{f.task_id}: {f.error}"
        term = f.terminal()
        assert len(term) == 1, f"{f.task_id}: {len(term)} terminal events; tail {f.events[-4:]}"
        assert f.events[-1] is term[0], f"{f.task_id}: events after the terminal"
        ids = [int(e.id) for e in f.events if e.id is not None]
        assert ids == sorted(set(ids)), f"{f.task_id}: ids repeat or go back across a resume"
        idx = f.token_indices()
        assert idx == list(range(len(idx))), f"{f.task_id}: a gap or repeat in token indices"
        last = term[0]
        if last.event == "end":
            assert len(idx) == want_tokens == last.json["tokens_out"], (f.task_id, len(idx))
            key = "end"
        else:
            assert last.json["retriable"] is True, f"{f.task_id}: not retriable: {last.json}"
            key = last.json["code"]
        outcomes[key] = outcomes.get(key, 0) + 1
    return outcomes


def ready_replicas(d: Daemon, pool: str = "default") -> int:
    try:
        status, _, raw = sync_request(d.host, d.port, "GET", f"/v1/pools/{pool}/health", d.headers)
    except OSError:
        return -1
    return int(json.loads(raw)["metrics"]["ready_replicas"]) if status == 200 else -1


def serves_again(d: Daemon, timeout: float, replicas: int = 2) -> float:
    """Seconds until every replica is ready again (full capacity, not half) and a new task
    runs to its end."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if ready_replicas(d) == replicas:
            with contextlib.suppress(AssertionError, OSError):
                (f,) = follow_now(d, [submit(d, 3)], 10.0)
                if f.terminal() and f.terminal()[0].event == "end":
                    return time.monotonic() - t0
        time.sleep(0.05)
    raise AssertionError(f"orchd did not serve at full capacity within {timeout}s")


def follow_now(d: Daemon, task_ids: list[str], timeout: float) -> list[Follower]:
    fs = [Follower(d, t) for t in task_ids]
    for f in fs:
        f.run(timeout)
    return fs


def leftovers(launcher_pid: int, run_dir: str) -> list[str]:
    """What an orchd (launcher ``launcher_pid``) left behind: rings, run directory."""
    left = [
        f"/dev/shm/{n}" for n in os.listdir("/dev/shm") if n.startswith(f"orchd-{launcher_pid}-")
    ]
    if run_dir and os.path.isdir(run_dir):
        left += [os.path.join(run_dir, n) for n in os.listdir(run_dir)] or [run_dir]
    return left
