"""One client process of the load generator: its share of a run's workers or arrivals, on one
asyncio loop (uvloop when installed), and what it measured (see perf/loadgen.py)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import re
import time
import traceback
from array import array
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Protocol

import numpy as np

from perf.http import OA_KEYS, Conn, DeltaCounter, Pool, StreamRec, request
from perf.metrics import Req, Window


@dataclass
class LoadSpec:
    port: int
    target: str = "orchd"  # "orchd" | "ceiling" | a label (with api "openai": any server)
    api: str = "native"  # "native": POST /v1/tasks + GET stream | "openai": one streamed POST
    path: str = "/v1/chat/completions"  # api "openai": the route (chat or completions)
    model: str = "mock:tiny"  # api "openai": the body's "model"
    host: str = "127.0.0.1"
    key: str = "dev"
    mode: str = "closed"  # "closed" | "rate" | "admit"
    concurrency: int = 64  # closed/admit: workers; rate: max concurrency (0 = none)
    request_rate: float = 0.0  # rate: requests/s over all shards
    burstiness: float = 1.0
    max_tokens: int = 256
    input_len: int = 8  # prompt words (the mock engine counts no real tokens)
    warmup_s: float = 1.0
    duration_s: float = 5.0
    drain_cap_s: float = 30.0
    ramp_s: float = 0.0  # closed: spread the workers' first requests evenly over this time
    stamps: bool = False  # the engine stamps tokens: measure emission -> receipt
    seed: int = 0


class Hooks(Protocol):
    def window_start(self) -> None: ...
    def window_end(self) -> None: ...
    def tick(self, now: float) -> None: ...


# ------------------------------------------------------------------------------ one shard


class Shard:
    def __init__(
        self, spec: LoadSpec, idx: int, nshards: int, t0: float, progress: Any, pending: Any
    ) -> None:
        self.spec, self.idx, self.nshards = spec, idx, nshards
        self.progress, self.pending = progress, pending
        self.w0 = int((t0 + spec.warmup_s) * 1e9)
        self.w1 = int((t0 + spec.warmup_s + spec.duration_s) * 1e9)
        self.t0 = t0
        self.pool = Pool(spec.host, spec.port)
        self.recs: list[StreamRec] = []
        self.win = Window(spec.duration_s, input_tokens_per_req=spec.input_len)
        self.stop = asyncio.Event()
        self.sent = 0
        self.done = 0
        self.my_pending = 0
        self.ids = itertools.count()
        self.tag = f"{os.getpid()}-{idx}-{random.getrandbits(32):08x}"  # task ids unique per run
        self.rng = random.Random(spec.seed * 1000 + idx)
        prompt = " ".join(f"w{i}" for i in range(spec.input_len))
        self.cpu = [0.0, 0.0]
        self.tasks: set[asyncio.Task[None]] = set()
        h, k = spec.host, spec.key
        self._ceiling_get = request("GET", f"/stream/{spec.max_tokens}", h, k)
        fixed = {
            "workload": "completion", "model_ref": "mock:tiny",
            "engine": "mock", "ctx": 2048, "priority": "interactive",
            "max_tokens": spec.max_tokens, "deadline_ms": 600000, "prompt": prompt,
        }  # fmt: skip
        self._body_head = json.dumps(fixed, separators=(",", ":"))[:-1] + ","
        self.oa_key = OA_KEYS["completions" if spec.path.endswith("/v1/completions") else "chat"]
        oa: dict[str, Any] = {"model": spec.model, "max_tokens": spec.max_tokens, "stream": True}
        if self.oa_key == b"text":
            oa["prompt"] = prompt
        else:
            oa["messages"] = [{"role": "user", "content": prompt}]
        self._oa_head = json.dumps(oa, separators=(",", ":"))[:-1] + ","

    def _oa_post(self, seed: int) -> bytes:
        s = self.spec
        body = self._oa_head + f'"seed":{seed}}}'
        return request("POST", s.path, s.host, s.key, body.encode(), bearer=True)

    def _post(self, tid: str, seed: int) -> bytes:
        # one session per task: a session holds at most 8 turns
        body = self._body_head + f'"seed":{seed},"task_id":"{tid}","session_id":"{tid}"}}'
        s = self.spec
        return request("POST", "/v1/tasks", s.host, s.key, body.encode())

    async def one(self) -> float:
        """One request; returns a back-off (s) the caller should wait before the next."""
        s = self.spec
        conn: Conn | None = None
        t_send = time.monotonic_ns()
        measured = self.w0 <= t_send < self.w1
        if measured:
            self.my_pending += 1
            self.pending[self.idx] = self.my_pending
        self.sent += 1
        req = Req(t_send, 0, 0, 0, 0, False)
        rec: StreamRec | None = None
        why = ""
        backoff = 0.0
        try:
            conn = await self.pool.acquire()
            if self.stop.is_set():
                conn.close()
                return 0.0
            t_send = req.send_ns = time.monotonic_ns()
            if s.api == "openai" and s.mode != "admit":
                # One request: the streamed POST is the whole exchange (TTFT from its write).
                stamps = array("q") if s.stamps and measured else None
                rec = StreamRec(stamps, DeltaCounter(self.oa_key))
                self.recs.append(rec)
                status, headers, body = await conn.stream(self._oa_post(next(self.ids)), rec)
                req.end_ns = time.monotonic_ns()
                if status in (429, 503):
                    if measured:
                        self.win.rejected += 1
                    ra = headers.get(b"retry-after", b"")
                    backoff = 0.05 if ra.isdigit() else 0.01
                    return backoff
                req.ok = status == 200 and rec.oa_done and rec.errors == 0 and rec.tokens > 0
                if not req.ok:
                    why = (
                        f"POST {status} {_code(body) or body[:80]!r}"
                        if status != 200
                        else f"error frame {rec.error_text[:120]!r}"
                        if rec.errors
                        else "stream cut short"
                        if not rec.oa_done
                        else "no token"
                    )
            else:
                if s.target == "orchd" or s.mode == "admit":
                    n = next(self.ids)
                    tid = f"b{self.tag}-{n}"
                    status, headers, body = await conn.simple(self._post(tid, n))
                    req.admit_ns = time.monotonic_ns()
                    if status != 202:
                        if status in (429, 503):
                            if measured:
                                self.win.rejected += 1
                            ms = headers.get(b"x-backoff-ms", b"10")
                            backoff = min(0.05, int(ms) / 1000.0) if ms.isdigit() else 0.01
                        elif measured:
                            self.win.failed += 1
                            self.win.fail(f"POST {status} {_code(body)}")
                        return backoff
                    if s.mode == "admit":
                        req.ok = True
                        req.first_ns = req.end_ns = req.admit_ns
                        if measured:
                            self.win.reqs.append(req)
                        if self.w0 <= req.end_ns < self.w1:
                            self.win.completed += 1
                        return 0.0
                    get = request("GET", f"/v1/tasks/{tid}/stream", s.host, s.key)
                else:
                    get = self._ceiling_get
                rec = StreamRec(array("q") if s.stamps and measured else None)
                self.recs.append(rec)
                status, _, body = await conn.stream(get, rec)
                req.end_ns = time.monotonic_ns()
                req.ok = status == 200 and rec.done and rec.errors == 0 and rec.tokens > 0
                if not req.ok:
                    why = (
                        f"GET {status} {_code(body)}"
                        if status != 200
                        else f"error event {_code(rec.error_text)}"
                        if rec.errors
                        else "stream cut short"
                        if not rec.done
                        else "no token"
                    )
        except (ConnectionError, OSError) as e:
            req.ok = False
            why = type(e).__name__
            backoff = 0.02  # a server that is not there must not spin the client
        finally:
            if conn is not None:
                self.pool.release(conn)
            if measured:
                self.my_pending -= 1
                self.pending[self.idx] = self.my_pending
            self.done += 1
        if rec is not None:
            req.tokens = rec.tokens
            req.chunks = len(rec.reads)
            if rec.reads:
                req.first_ns = rec.reads[0]
        if req.ok and self.w0 <= req.end_ns < self.w1:
            self.win.completed += 1
        if measured:
            if self.stop.is_set() and not req.ok:
                self.win.failed += 1  # cut off at the drain cap
                self.win.fail("cut off at the drain cap")
            else:
                if not req.ok:
                    self.win.fail(why)
                self.win.reqs.append(req)
                if req.ok and rec is not None and len(rec.reads) > 1:
                    self.win.gaps_us += array("q", (np.diff(rec.reads) // 1000).tolist())
                if rec is not None and rec.stamps is not None:
                    self.win.stamps_us += rec.stamps
        return backoff

    async def worker(self, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        while not self.stop.is_set():
            backoff = await self.one()
            if backoff:
                await asyncio.sleep(backoff)

    async def arrivals(self, rate: float, cap: int) -> None:
        sem = asyncio.Semaphore(cap) if cap > 0 else None
        b = self.spec.burstiness
        t = time.monotonic()

        async def limited() -> None:
            if sem is None:
                await self.one()
                return
            async with sem:
                await self.one()

        while not self.stop.is_set():
            t += self.rng.gammavariate(b, 1.0 / (rate * b))
            delay = t - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.get_running_loop().create_task(limited())
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def monitor(self) -> None:
        cap = self.w1 + int(self.spec.drain_cap_s * 1e9)
        in_window = False
        while True:
            now = time.monotonic_ns()
            if not in_window and now >= self.w0:
                self.cpu[0] = time.process_time()
                in_window = True
            if now >= self.w1:
                if self.cpu[1] == 0.0:
                    self.cpu[1] = time.process_time()
                if sum(self.pending[:]) == 0 or now >= cap:
                    self.stop.set()
                    return
            base = self.idx * 4
            self.progress[base] = self.pool.counter[0]
            self.progress[base + 1] = self.done
            self.progress[base + 2] = self.sent
            await asyncio.sleep(0.02)

    async def run(self) -> tuple[Window, float]:
        s = self.spec
        delay = self.t0 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        loop = asyncio.get_running_loop()
        mon = loop.create_task(self.monitor())
        if s.mode in ("closed", "admit"):
            n = s.concurrency // self.nshards + (
                1 if self.idx < s.concurrency % self.nshards else 0
            )
            for j in range(n):
                g = self.idx + j * self.nshards  # this worker's place among all shards' workers
                t = loop.create_task(self.worker(s.ramp_s * g / max(1, s.concurrency)))
                self.tasks.add(t)
                t.add_done_callback(self.tasks.discard)
        else:
            cap = s.concurrency
            share = cap // self.nshards + (1 if self.idx < cap % self.nshards else 0) if cap else 0
            gen = loop.create_task(self.arrivals(s.request_rate / self.nshards, share))
        await mon
        self.pool.close()  # ends every request still running: unmeasured filler
        if s.mode == "rate":
            gen.cancel()
        if self.tasks:
            _, late = await asyncio.wait(set(self.tasks), timeout=2.0)
            self.pool.close()  # a connection opened while we were closing the others
            for t in late:
                t.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self._window_counts()
        self.win.connections = self.pool.opened
        return self.win, self.cpu[1] - self.cpu[0]

    def _window_counts(self) -> None:
        w = self.win
        nb = max(1, int(np.ceil(self.spec.duration_s)))
        buckets = np.zeros(nb, dtype=np.int64)
        for rec in self.recs:
            if not rec.reads:
                continue
            t = np.frombuffer(rec.reads, dtype=np.int64)
            c = np.frombuffer(rec.counts, dtype=np.int64 if rec.counts.itemsize == 8 else np.int32)
            m = (t >= self.w0) & (t < self.w1)
            if not m.any():
                continue
            w.tokens += int(c[m].sum())
            w.chunks += int(m.sum())
            b = ((t[m] - self.w0) // 1_000_000_000).clip(0, nb - 1)
            np.add.at(buckets, b, c[m])
        w.buckets = buckets.tolist()


def _code(body: bytes) -> str:
    """The error code of an orchd error body or `error` frame, if it has one."""
    m = _CODE.search(body)
    return m.group(1).decode() if m else ""


_CODE = re.compile(rb'"code":\s*"([A-Z_]+)"')


def _shard_main(conn: Connection, idx: int, nshards: int, progress: Any, pending: Any) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    while True:
        job = conn.recv()
        if job is None:
            return
        spec, t0 = job
        try:
            conn.send(asyncio.run(Shard(spec, idx, nshards, t0, progress, pending).run()))
        except Exception:
            conn.send(traceback.format_exc())
