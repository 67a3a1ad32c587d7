"""Background load on a live orchd, for tests that watch its metrics from outside: streams
read to the end, streams canceled by their client mid-way, and submissions orchd refuses.
A stream that ends with an ``error`` event (a test killed its engine) counts as ``error``;
anything else off these paths is kept in ``failures``."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import httpx

from tests.support.daemon import Daemon
from tests.support.tasks import task_body

# One round of each worker: mostly complete streams, one client cancel, one refusal (no
# replica serves the engine "tgi": refused at admission).
MIX = ("stream", "stream", "cancel", "stream", "reject")


class Traffic:
    def __init__(self, d: Daemon, workers: int = 2, max_tokens: int = 24) -> None:
        self.d = d
        self.max_tokens = max_tokens
        self.counts: Counter[str] = Counter()
        self.failures: list[str] = []  # anything off the expected path, for the test to show
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(workers)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)

    def count(self, kind: str) -> int:
        with self._lock:
            return self.counts[kind]

    def _run(self) -> None:
        with httpx.Client(base_url=self.d.base, headers=self.d.headers, timeout=30) as c:
            i = 0
            while not self._stop.is_set():
                kind = MIX[i % len(MIX)]
                i += 1
                try:
                    ok = getattr(self, f"_{kind}")(c)
                except Exception as e:  # recorded for the test to show, never lost in a thread
                    ok = f"{kind}: {e!r}"
                with self._lock:
                    if ok is True:
                        self.counts[kind] += 1
                    elif ok == "error":
                        self.counts["error"] += 1
                    else:
                        self.failures.append(str(ok))

    def _submit(self, c: httpx.Client, **over: Any) -> httpx.Response:
        return c.post("/v1/tasks", json=task_body(**{"max_tokens": self.max_tokens, **over}))

    def _stream(self, c: httpx.Client) -> bool | str:
        r = self._submit(c)
        if r.status_code != 202:
            return f"stream submit: {r.status_code} {r.text}"
        with c.stream("GET", f"/v1/tasks/{r.json()['task_id']}/stream") as s:
            for line in s.iter_lines():
                if line == "event: end":
                    return True
                if line == "event: error":
                    return "error"  # e.g. WORKER_RESET when a test kills an engine
        return "stream: no terminal event"

    def _cancel(self, c: httpx.Client) -> bool | str:
        r = self._submit(c, max_tokens=2_000)  # canceled long before its end
        if r.status_code != 202:
            return f"cancel submit: {r.status_code} {r.text}"
        task_id = r.json()["task_id"]
        with c.stream("GET", f"/v1/tasks/{task_id}/stream") as s:
            for line in s.iter_lines():
                if line == "event: token":
                    status = c.post(f"/v1/tasks/{task_id}/cancel").status_code
                    return True if status == 204 else f"cancel: {status}"
                if line == "event: error":
                    return "error"
        return "cancel: no token"

    def _reject(self, c: httpx.Client) -> bool | str:
        r = self._submit(c, engine="tgi")
        return True if r.status_code >= 400 else f"reject: {r.status_code} {r.text}"
