"""The direct baseline: the mock engine's own TTFT, ITL and output rate, without orchd.

It starts the same mock engine processes the supervisors would (``engine_procs.mock_engine``,
same config), speaks their ZeroMQ PAIR protocol itself (``EngSubmit`` in, ``EngStep`` out,
as ``engine_procs/adapters/mock.py`` does) and drives them with the same arrival pattern and
timeline as the HTTP load client: warm-up, window, drain with the load kept on. A request's
TTFT runs from its ``EngSubmit`` to the receipt of the step carrying its first token; its
tokens arrive one step (one "chunk") at a time, so ITL and TPOT follow the HTTP definitions.
orchd's added latency is then orchd's figure minus this one.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass, field
from typing import Any

import msgspec
import psutil
import zmq

from ipc import protocol as p
from orchd.config import MockEngine
from perf.loadgen import LoadSpec, spec_fields
from perf.metrics import Req, Window, parse_slo, summarize
from perf.procs import CpuSampler
from perf.progress import Bar


@dataclass(slots=True)
class _Run:
    eng: int
    req: Req
    measured: bool
    reads: array = field(default_factory=lambda: array("q"))
    counts: array = field(default_factory=lambda: array("l"))
    stamps: array | None = None


class Direct:
    """``engines`` mock engine processes, each with ``mock`` as its config."""

    def __init__(self, engines: int, mock: dict[str, Any]) -> None:
        self.dir = tempfile.mkdtemp(prefix="orchd-direct-")
        self.cfg = msgspec.convert(mock, MockEngine)
        self.ctx = zmq.Context()
        self.socks: list[zmq.Socket[bytes]] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        cfg_json = msgspec.json.encode(self.cfg).decode()
        for i in range(engines):
            addr = f"ipc://{self.dir}/engine-{i}.sock"
            s = self.ctx.socket(zmq.PAIR)
            s.setsockopt(zmq.SNDHWM, 1024)
            s.setsockopt(zmq.RCVHWM, 4)
            s.setsockopt(zmq.LINGER, 0)
            s.bind(addr)
            self.socks.append(s)
            self.procs.append(
                subprocess.Popen([sys.executable, "-m", "engine_procs.mock_engine", addr, cfg_json])
            )
        for s in self.socks:
            if not s.poll(30_000):
                self.close()
                raise RuntimeError("mock engine not ready after 30 s")
            msg = p.decode_engine(s.recv())
            assert isinstance(msg, p.EngReady), msg
        self.rids = itertools.count(1)

    def pids(self) -> dict[int, str]:
        return {pr.pid: f"engine{i}" for i, pr in enumerate(self.procs)}

    def run(
        self, spec: LoadSpec, label: str, slo: dict[str, float] | None = None
    ) -> dict[str, Any]:
        """One run with ``spec``'s mode, concurrency/rate, max_tokens and timeline."""
        n_eng = len(self.socks)
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        runs: dict[int, _Run] = {}
        finished: list[_Run] = []
        rng = random.Random(spec.seed)
        t0 = time.monotonic_ns() + 100_000_000
        w0 = t0 + int(spec.warmup_s * 1e9)
        w1 = w0 + int(spec.duration_s * 1e9)
        cap = w1 + int(spec.drain_cap_s * 1e9)
        next_arrival = t0
        rr = itertools.count()
        pending = 0
        sampler = CpuSampler(None, self.pids())
        phase = 0
        cpu0 = cpu1 = 0.0
        bar = Bar(label, spec.warmup_s + spec.duration_s)
        tokens_seen = done = 0
        prompt = " ".join(f"w{i}" for i in range(spec.input_len))

        def submit(now: int) -> None:
            nonlocal pending
            rid = next(self.rids)
            e = next(rr) % n_eng
            measured = w0 <= now < w1
            pending += measured
            run = _Run(e, Req(now, 0, 0, 0, 0, False), measured)
            if spec.stamps and measured:
                run.stamps = array("q")
            runs[rid] = run
            msg = p.EngSubmit(rid, prompt, rid, spec.max_tokens)
            self.socks[e].send(p.encode(msg))

        while True:
            now = time.monotonic_ns()
            if phase == 0 and now >= w0:
                sampler.window_start()
                cpu0 = time.process_time()
                phase = 1
            if phase == 1 and now >= w1:
                sampler.window_end()
                cpu1 = time.process_time()
                phase = 2
            if phase == 2 and (pending == 0 or now >= cap):
                break
            bar.update((now - t0) / 1e9, tokens_seen, done, phase == 2)
            if now >= t0:
                if spec.mode == "closed":
                    # Workers join one by one over the ramp, as the HTTP client's do.
                    joined = spec.concurrency
                    if spec.ramp_s > 0:
                        joined = min(joined, int((now - t0) / 1e9 / spec.ramp_s * joined) + 1)
                    while len(runs) < joined:
                        submit(time.monotonic_ns())
                else:
                    while now >= next_arrival and (
                        not spec.concurrency or len(runs) < spec.concurrency
                    ):
                        submit(time.monotonic_ns())
                        b = spec.burstiness
                        gap = rng.gammavariate(b, 1.0 / (spec.request_rate * b))
                        next_arrival += int(gap * 1e9)
            timeout = 20.0
            if spec.mode == "closed" and spec.ramp_s > 0 and now < t0 + spec.ramp_s * 1e9:
                timeout = 1.0
            if spec.mode == "rate" and now < next_arrival:
                timeout = min(timeout, (next_arrival - now) / 1e6)
            for sock, _ in poller.poll(max(math.ceil(timeout), 0)):
                while True:
                    try:
                        data = sock.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    t = time.monotonic_ns()
                    msg = p.decode_engine(data)
                    if not isinstance(msg, p.EngStep):
                        continue
                    for rid, toks in msg.tokens:
                        r = runs.get(rid)
                        if r is None:
                            continue
                        r.reads.append(t)
                        r.counts.append(len(toks))
                        tokens_seen += len(toks)
                        if r.stamps is not None:
                            r.stamps.append((t - msg.t_ns) // 1000)
                    for rid, _reason in msg.finished:
                        r = runs.pop(rid, None)
                        if r is None:
                            continue
                        r.req.end_ns = t
                        r.req.ok = True
                        finished.append(r)
                        done += 1
                        pending -= r.measured
                    for rid, _msg in msg.errors:
                        r = runs.pop(rid, None)
                        if r is not None:
                            r.req.end_ns = t
                            finished.append(r)
                            pending -= r.measured
        bar.close()
        # Abort what is left (unmeasured filler, or cut off at the cap) and drain the engines.
        for rid, r in runs.items():
            self.socks[r.eng].send(p.encode(p.EngAbort(rid)))
            finished.append(r)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            if not poller.poll(50):
                break
            for s in self.socks:
                with contextlib.suppress(zmq.Again):
                    while True:
                        s.recv(zmq.NOBLOCK)
        out = summarize(self._window(spec, finished, w0, w1), slo or parse_slo(None))
        out.update(spec_fields(spec))
        out["backend"] = out["endpoint_type"] = "direct"
        out["server_cpu_pct_by_role"] = sampler.by_role()
        out["server_cpu_pct_total"] = sampler.total()
        out["client_cpu_cores"] = round((cpu1 - cpu0) / spec.duration_s, 3)  # the driver
        out["client_saturated"] = out["client_cpu_cores"] > 0.8
        return out

    def _window(self, spec: LoadSpec, runs: list[_Run], w0: int, w1: int) -> Window:
        import numpy as np

        win = Window(spec.duration_s, input_tokens_per_req=spec.input_len)
        nb = max(1, int(np.ceil(spec.duration_s)))
        buckets = np.zeros(nb, dtype=np.int64)
        for r in runs:
            q = r.req
            q.tokens = int(sum(r.counts))
            q.chunks = len(r.reads)
            q.first_ns = r.reads[0] if r.reads else 0
            if q.ok and w0 <= q.end_ns < w1:
                win.completed += 1
            if r.measured:
                win.reqs.append(q)
                if not q.ok:
                    win.fail("engine error" if q.end_ns else "aborted at the drain cap")
                if q.ok and len(r.reads) > 1:
                    win.gaps_us += array("q", (np.diff(r.reads) // 1000).tolist())
                if r.stamps is not None:
                    win.stamps_us += r.stamps
            if r.reads:
                t = np.frombuffer(r.reads, dtype=np.int64)
                c = np.array(r.counts, dtype=np.int64)
                m = (t >= w0) & (t < w1)
                win.tokens += int(c[m].sum())
                win.chunks += int(m.sum())
                np.add.at(buckets, ((t[m] - w0) // 1_000_000_000).clip(0, nb - 1), c[m])
        win.buckets = buckets.tolist()
        return win

    def close(self) -> None:
        for pr in self.procs:
            with contextlib.suppress(psutil.Error, OSError):
                pr.kill()
                pr.wait(5)
        for s in self.socks:
            s.close(0)
        self.ctx.term()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Direct:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":  # a quick look: python -m perf.direct [concurrency] [itl_ms]
    conc = int(sys.argv[1]) if len(sys.argv) > 1 else 64
    itl = float(sys.argv[2]) if len(sys.argv) > 2 else 20.0
    with Direct(1, {"ttft_ms": 0, "itl_ms": itl, "stamp_tokens": True}) as d:
        spec = LoadSpec(port=0, concurrency=conc, max_tokens=100, duration_s=4, stamps=True)
        res = d.run(spec, "direct")
    keys = ("completed", "output_throughput", "median_ttft_ms", "p99_ttft_ms", "p99_itl_ms")
    print({k: res[k] for k in keys}, os.cpu_count())
