"""``orchd check``: the start-up self-tests of the spec, run against a config before serving.

It starts a real orchd with that config on a free loopback port, in its own run directory,
with a one-time admin key and JSON logs, and checks, printing one line per check:

- ``start``: orchd comes up (every frontend and every replica has reported);
- ``engine <replica>``: each engine answered its adapter's start-up ping (ready), else the
  reason it gave (a dead URL, a missing model file, ...);
- ``decode <pool>``: one task of one token per pool streams ``started``, a token, ``end``;
- ``cancel``: a long task canceled after its first token ends ``canceled``, its ``end``
  counting every token streamed (nothing after it);
- ``metrics``: ``/metrics`` counts those tasks, tokens and the cancel;
- ``logs``: the access, admission and stream-end lines of the decode request carry its
  correlation id;
- ``stop``: SIGTERM drains and orchd exits 0.

:func:`run_check` returns whether all passed; ``orchd check`` exits 1 otherwise, and
``orchd serve --self-test`` does not serve.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from orchd.config import Config, ConfigError, Pool, load

START_GRACE_S = 30.0  # beyond the slowest replica's endpoint.ready_timeout_s
REQUEST_TIMEOUT_S = 60.0  # one check's HTTP exchange
LOG_WAIT_S = 5.0  # for a process's deferred log lines to arrive


class Daemon:
    """The orchd under test: a ``orchd serve`` child whose stderr is read into records."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            argv,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self.records: list[dict[str, Any]] = []
        self.raw: list[str] = []  # lines that are not JSON records (a crash's traceback)
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            text = line.decode("utf-8", "replace").rstrip("\n")
            try:
                rec = json.loads(text)
            except ValueError:
                rec = None
            with self.lock:
                if isinstance(rec, dict):
                    self.records.append(rec)
                elif text.strip():
                    self.raw.append(text)

    def find(self, pred: Callable[[dict[str, Any]], bool]) -> list[dict[str, Any]]:
        with self.lock:
            return [r for r in self.records if pred(r)]

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any] | None:
        end = time.monotonic() + timeout_s
        while True:
            found = self.find(pred)
            if found:
                return found[0]
            if time.monotonic() >= end or self.proc.poll() is not None:
                return None
            time.sleep(0.05)

    def last_error(self) -> str:
        with self.lock:
            errors = [r for r in self.records if r.get("level") == "error"]
            if errors:
                r = errors[-1]
                return f"{r.get('component')}: {r.get('narration')} {r.get('error') or r.get('reason') or ''}".strip()
            return self.raw[-1] if self.raw else "no output"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(5.0)


def _sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, Any]]]:
    event, data = "", ""
    for line in lines:
        if not line:
            if event:
                yield event, json.loads(data) if data else {}
            event, data = "", ""
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data += line[5:].strip()


def _metric(text: str, name: str) -> float:
    """The sum of a metric's samples over every label set."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and line[len(name) : len(name) + 1] in ("{", " "):
            with contextlib.suppress(ValueError):
                total += float(line.rsplit(" ", 1)[1])
    return total


class Check:
    def __init__(
        self, cfg: Config, path: str | None, flags: list[str], emit: Callable[[str], None]
    ) -> None:
        self.cfg = cfg
        self.path = path
        self.flags = flags
        self.emit = emit
        self.key = "check-" + secrets.token_hex(16)
        self.failed = 0
        self.passed = 0
        self.url = ""
        self.http = httpx.Client(timeout=REQUEST_TIMEOUT_S, headers={"X-API-Key": self.key})

    def result(self, ok: bool, name: str, detail: str) -> bool:
        self.emit(f"{'ok  ' if ok else 'FAIL'}  {name}: {detail}")
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        return ok

    def run(self) -> bool:
        run_dir = tempfile.mkdtemp(prefix="orchd-check-")
        env = dict(os.environ)
        env.update(
            ORCHD_HOST="127.0.0.1",
            ORCHD_PORT="0",
            ORCHD_RUN_DIR=os.path.join(run_dir, "run"),
            ORCHD_API_KEYS=self.key,
            ORCHD_LOG_FORMAT="json",
            ORCHD_LOG_LEVEL="info",
            ORCHD_ARTIFACT_DIR=os.path.join(run_dir, "artifacts"),
            PYTHONUNBUFFERED="1",
        )
        if self.cfg.server.run_dir and not self.cfg.catalog.model_roots:
            # The default model root is <run_dir>/models: keep the configured one.
            env["ORCHD_MODEL_ROOTS"] = os.path.abspath(
                os.path.join(self.cfg.server.run_dir, "models")
            )
        argv = [sys.executable, "-m", "orchd.cli", "serve", *self.flags]
        if self.path:
            argv += ["--config", self.path]
        d = Daemon(argv, env)
        try:
            if self.start(d):
                ready = self.engines(d)
                cids = [self.decode(p, ready) for p in self.cfg.all_pools()]
                self.cancel(ready)
                self.metrics()
                self.logs(d, [c for c in cids if c])
                self.stop(d)
        finally:
            d.kill()
            self.http.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        total = self.passed + self.failed
        if self.failed:
            self.emit(f"orchd check: {self.failed} of {total} checks failed")
        else:
            self.emit(f"orchd check: all {total} checks passed")
        return self.failed == 0

    def start(self, d: Daemon) -> bool:
        budget = max(r.endpoint.ready_timeout_s for r in self.cfg.replicas) + START_GRACE_S
        t0 = time.monotonic()
        rec = d.wait_for(
            lambda r: r.get("component") == "launcher" and r.get("narration") == "ready", budget
        )
        if rec is None:
            if d.proc.poll() is not None:
                why = f"orchd exited with status {d.proc.returncode}: {d.last_error()}"
            else:
                why = f"not ready after {budget:g} s: {d.last_error()}"
            return self.result(False, "start", why)
        self.url = str(rec["url"])
        took = time.monotonic() - t0
        return self.result(True, "start", f"ready on {self.url} in {took:.1f} s")

    def engines(self, d: Daemon) -> set[str]:
        """Each replica's last report; the pools with a ready one."""
        states: dict[str, dict[str, Any]] = {}
        for r in d.find(lambda r: r.get("component") == "scheduler" and "replica_id" in r):
            if r.get("narration") in ("replica is ready", "replica is not ready"):
                states[str(r["replica_id"])] = r
        ready_pools: set[str] = set()
        auto = self.cfg.server.gpus == "auto"  # one replica per GPU: named as they report
        names = sorted(states) if auto else [r.id for r in self.cfg.replicas]
        for name in names:
            rec = states.get(name)
            rep = next((r for r in self.cfg.replicas if r.id == name), self.cfg.replicas[0])
            what = f"engine {name} ({rep.engine} via {rep.adapter_name})"
            if rec is None:
                self.result(False, what, "never reported to the scheduler")
            elif rec["narration"] == "replica is ready":
                ready_pools.add(rep.pool_id)
                self.result(True, what, f"ready, {rec.get('engine_version') or 'version unknown'}")
            else:
                self.result(False, what, f"not ready: {rec.get('last_error') or 'no reason given'}")
        return ready_pools

    def _task(self, pool: Pool, task_id: str, max_tokens: int) -> dict[str, Any]:
        return {
            "task_id": task_id,
            "session_id": "orchd-check",
            "workload": "completion",
            "model_ref": pool.model_ref,
            "engine": pool.engine,
            "ctx": min(256, self.cfg.limits.ctx_limit),
            "priority": "interactive",
            "max_tokens": max_tokens,
            "deadline_ms": int(REQUEST_TIMEOUT_S * 1000),
            "prompt": "Hello",
            "placement": {"mode": "pin", "pin_pool_id": pool.id, "allow_fallback": False},
        }

    def _submit(self, body: dict[str, Any], cid: str) -> str | None:
        r = self.http.post(f"{self.url}/v1/tasks", json=body, headers={"X-Correlation-Id": cid})
        if r.status_code != 202:
            return f"submit answered {r.status_code}: {r.text[:200]}"
        return None

    def decode(self, pool: Pool, ready: set[str]) -> str:
        what = f"decode {pool.id}"
        if "completion" not in pool.supported_workloads:
            self.emit(f"skip  {what}: the pool serves no completions")
            return ""
        if pool.id not in ready:
            self.result(False, what, "no ready replica to decode on")
            return ""
        cid = "check-" + secrets.token_hex(8)
        tid = "check-decode-" + pool.id
        t0 = time.monotonic()
        try:
            err = self._submit(self._task(pool, tid, 1), cid)
            if err:
                self.result(False, what, err)
                return ""
            events = []
            with self.http.stream("GET", f"{self.url}/v1/tasks/{tid}/stream") as resp:
                if resp.status_code != 200:
                    self.result(False, what, f"stream answered {resp.status_code}")
                    return ""
                for ev, data in _sse(resp.iter_lines()):
                    events.append((ev, data))
                    if ev in ("end", "error"):
                        break
        except (httpx.HTTPError, ValueError) as e:
            self.result(False, what, f"{type(e).__name__}: {e}")
            return ""
        kinds = [e for e, _ in events]
        if kinds[:1] != ["started"] or "token" not in kinds or kinds[-1:] != ["end"]:
            last = events[-1][1] if events else {}
            self.result(False, what, f"expected started, token, end; got {kinds} {last}")
            return ""
        ms = (time.monotonic() - t0) * 1000.0
        started = events[0][1]
        self.result(True, what, f"1 token from {started.get('replica_id')} in {ms:.0f} ms")
        return cid

    def cancel(self, ready: set[str]) -> None:
        pool = next(
            (
                p
                for p in self.cfg.all_pools()
                if p.id in ready and "completion" in p.supported_workloads
            ),
            None,
        )
        if pool is None:
            self.result(False, "cancel", "no ready pool to run a task on")
            return
        tid = "check-cancel"
        try:
            err = self._submit(
                self._task(pool, tid, self.cfg.limits.max_tokens_limit), "check-cancel"
            )
            if err:
                self.result(False, "cancel", err)
                return
            answered = False
            got, end = 0, None
            with self.http.stream("GET", f"{self.url}/v1/tasks/{tid}/stream") as resp:
                for ev, data in _sse(resp.iter_lines()):
                    if ev == "token":
                        got += 1
                    if ev == "token" and not answered:
                        r = self.http.post(f"{self.url}/v1/tasks/{tid}/cancel")
                        if r.status_code != 204:
                            why = f"cancel answered {r.status_code}: {r.text[:200]}"
                            self.result(False, "cancel", why)
                            return
                        answered = True
                    elif ev in ("end", "error"):
                        end = (ev, data)
                        break
        except (httpx.HTTPError, ValueError) as e:
            self.result(False, "cancel", f"{type(e).__name__}: {e}")
            return
        if end is None or end[0] != "end" or end[1].get("reason") != "canceled":
            self.result(False, "cancel", f"the stream ended with {end} instead of end (canceled)")
        elif end[1].get("tokens_out") != got:
            why = f"{got} tokens streamed but the end counts {end[1].get('tokens_out')}"
            self.result(False, "cancel", why)
        else:
            self.result(True, "cancel", f"pool {pool.id}: ended canceled after {got} tokens")

    def metrics(self) -> None:
        try:
            r = httpx.get(f"{self.url}/metrics", timeout=REQUEST_TIMEOUT_S)
        except httpx.HTTPError as e:
            self.result(False, "metrics", f"{type(e).__name__}: {e}")
            return
        if r.status_code != 200:
            self.result(False, "metrics", f"/metrics answered {r.status_code}")
            return
        seen = {
            n: _metric(r.text, n)
            for n in ("tasks_enqueued_total", "tokens_out_total", "tasks_canceled_total")
        }
        missing = [n for n, v in seen.items() if v < 1]
        if missing:
            self.result(
                False, "metrics", f"/metrics does not count the check's tasks: {missing} = 0"
            )
        else:
            self.result(True, "metrics", ", ".join(f"{n} {v:g}" for n, v in seen.items()))

    def logs(self, d: Daemon, cids: list[str]) -> None:
        if not cids:
            self.result(False, "logs", "no decode ran, so no request's lines to look for")
            return
        cid = cids[0]
        wanted = {  # what each process writes about the request: (component prefix, narration)
            "access line (frontend)": ("frontend", "access"),
            "admission line (scheduler)": ("scheduler", "admitted"),
            "stream-end line (supervisor)": ("supervisor", "stream ended"),
        }

        def seen(component: str, narration: str) -> bool:
            def pred(r: dict[str, Any]) -> bool:
                return (
                    r.get("cid") == cid
                    and str(r.get("component", "")).startswith(component)
                    and r.get("narration") == narration
                )

            return d.wait_for(pred, LOG_WAIT_S) is not None

        missing = [name for name, (comp, narr) in wanted.items() if not seen(comp, narr)]
        if missing:
            self.result(False, "logs", f"no {', '.join(missing)} with correlation id {cid}")
        else:
            self.result(True, "logs", f"access, admission and stream-end lines carry {cid}")

    def stop(self, d: Daemon) -> None:
        d.proc.send_signal(signal.SIGTERM)
        budget = self.cfg.server.drain_deadline_ms / 1000.0 + START_GRACE_S
        try:
            code = d.proc.wait(budget)
        except subprocess.TimeoutExpired:
            self.result(False, "stop", f"orchd still running {budget:g} s after SIGTERM")
            return
        if code != 0:
            self.result(False, "stop", f"orchd exited with status {code}: {d.last_error()}")
        else:
            self.result(True, "stop", "drained and exited 0")


def run_check(
    path: str | None,
    frontends: int | None = None,
    gpus: str | None = None,
    emit: Callable[[str], None] | None = None,
) -> bool:
    """Check the config at ``path`` (None: ``ORCHD_CONFIG`` or the built-in one), run with
    ``--frontends`` and ``--gpus`` as given."""
    say = emit or (lambda line: print(line, flush=True))
    flags = [] if frontends is None else ["--frontends", str(frontends)]
    flags += [] if gpus is None else ["--gpus", gpus]
    try:
        cfg = load(path, cli={"frontends": frontends, "gpus": gpus})
    except ConfigError as e:
        say(f"FAIL  config: {e}")
        say("orchd check: 1 of 1 checks failed")
        return False
    say(
        f"ok    config: {path or 'built-in defaults'}: {len(cfg.replicas)} replicas, {len(cfg.all_pools())} pools"
    )
    check = Check(cfg, path, flags, say)
    check.passed = 1
    return check.run()
