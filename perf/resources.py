"""Resource scenarios: idle CPU, frontend memory per open idle stream, RSS over a long run."""

from __future__ import annotations

import asyncio
import contextlib
import json
import statistics
import time

from perf.http import Conn, request
from perf.loadgen import LoadSpec
from perf.procs import CpuSampler, Orchd, orchd_config
from perf.progress import Bar
from perf.scenarios import UNLIMITED, Bench, brief

MB = 1024 * 1024


def idle(b: Bench) -> None:
    p = b.p
    b.say(f"[idle] {p.idle_replicas} replicas, no traffic, {p.idle_s:.0f} s")
    o = Orchd(orchd_config(p.idle_replicas, 64, {}))
    try:
        time.sleep(3.0)  # start-up settles
        s = CpuSampler(o)
        s.window_start()
        bar = Bar("idle", p.idle_s)
        t0 = time.monotonic()
        while (now := time.monotonic()) - t0 < p.idle_s:
            bar.update(now - t0, 0, 0, False)
            time.sleep(0.25)
        bar.close()
        s.window_end()
    finally:
        o.stop()
    total = s.total()
    b.results["idle"] = {
        "replicas": p.idle_replicas,
        "window_s": p.idle_s,
        "cpu_pct_of_one_core_total": total,
        "cpu_pct_by_role": s.by_role(),
    }
    b.say(f"    by role: {s.by_role()}")
    b.row(
        f"idle CPU, {p.idle_replicas} replicas (% of one core)",
        total,
        "%",
        target="< 1% of one core",
        met=total < 1.0,
    )


# ------------------------------------------------------------------------------ memory


async def _open_streams(port: int, n: int, tag: str) -> list[Conn]:
    """``n`` SSE streams of tasks that never produce a token, each open on its own socket."""
    loop = asyncio.get_running_loop()
    conns: list[Conn] = []
    sem = asyncio.Semaphore(64)

    async def one(i: int) -> None:
        async with sem:
            _, c = await loop.create_connection(Conn, "127.0.0.1", port)
            tid = f"hold-{tag}-{i}"
            body = {
                "task_id": tid, "session_id": tid, "workload": "completion",
                "model_ref": "mock:tiny", "engine": "mock", "ctx": 2048,
                "priority": "interactive", "max_tokens": 16, "deadline_ms": 3_600_000,
                "seed": i, "prompt": "hold",
            }  # fmt: skip
            h = "127.0.0.1"
            status, _, text = await c.simple(
                request("POST", "/v1/tasks", h, "dev", json.dumps(body).encode())
            )
            if status != 202:
                c.close()
                raise RuntimeError(f"POST answered {status} while opening idle streams: {text!r}")
            c.got_head = asyncio.Event()
            c.transport.write(request("GET", f"/v1/tasks/{tid}/stream", h, "dev"))  # type: ignore[union-attr]
            await c.got_head.wait()
            conns.append(c)

    await asyncio.gather(*(one(i) for i in range(n)))
    return conns


def _frontend_rss(o: Orchd) -> int:
    return sum(o.rss("frontend").values())


def memory(b: Bench) -> None:
    p = b.p
    most = max(p.mem_streams)
    b.say(f"[memory] frontend RSS per open idle stream: {p.mem_streams} streams")
    # Slow engines: every task is dispatched (slots for all) and then never sends a token.
    slots = most // b.replicas + 1
    o = b.orchd({"ttft_ms": 1e9, "itl_ms": 0}, slots, queue_capacity=most * 2)
    points = []
    try:
        loop = asyncio.new_event_loop()
        try:
            warm = loop.run_until_complete(_open_streams(o.port, 100, "warm"))
            for c in warm:
                c.close()
            time.sleep(1.5)
            for k in p.mem_streams:
                rss0 = _frontend_rss(o)
                t0 = time.monotonic()
                conns = loop.run_until_complete(_open_streams(o.port, k, f"k{k}"))
                opened_s = time.monotonic() - t0
                time.sleep(1.0)
                rss1 = _frontend_rss(o)
                for c in conns:
                    c.close()
                loop.run_until_complete(asyncio.sleep(0.1))
                time.sleep(2.0)
                rss2 = _frontend_rss(o)
                per_k = (rss1 - rss0) / k * 1000 / MB
                points.append(
                    {
                        "streams": k,
                        "rss_before_mb": round(rss0 / MB, 2),
                        "rss_open_mb": round(rss1 / MB, 2),
                        "rss_after_close_mb": round(rss2 / MB, 2),
                        "growth_mb_per_1000": round(per_k, 3),
                        "open_s": round(opened_s, 2),
                    }
                )
                b.say(f"    {points[-1]}")
        finally:
            loop.close()
    finally:
        o.stop()
    b.results["memory"] = {"points": points}
    worst = max(pt["growth_mb_per_1000"] for pt in points)
    b.row(
        "frontend RSS growth per 1,000 idle streams",
        worst,
        "MB",
        target="<= 20 MB",
        met=worst <= 20.0,
        note=f"largest of {len(points)} point(s), up to {most} streams",
    )


# ------------------------------------------------------------------------------ soak


class _RssSampler(CpuSampler):
    def __init__(self, o: Orchd, every_s: float = 10.0) -> None:
        super().__init__(o)
        self.o = o
        self.every = every_s
        self.next = 0.0
        self.samples: list[tuple[float, float]] = []  # (t, frontend RSS MB)
        self.t_start = 0.0

    def window_start(self) -> None:
        super().window_start()
        self.t_start = time.monotonic()
        self.next = self.t_start

    def tick(self, now: float) -> None:
        if self.t_start and now >= self.next and not self.c1:
            with contextlib.suppress(Exception):
                self.samples.append((round(now - self.t_start, 1), _frontend_rss(self.o) / MB))
            self.next = now + self.every


def soak(b: Bench, capacity_rps: float) -> None:
    p = b.p
    if p.soak_s <= 0 or capacity_rps <= 0:
        b.say("[soak] skipped in this profile (bench-full runs it)")
        b.row(
            "frontend RSS drift over a long run",
            None,
            "%",
            target="within 5% over 10 min at 80% capacity",
            note="not run in this profile: make bench-full",
        )
        return
    rate = 0.8 * capacity_rps
    b.say(f"[soak] {p.soak_s:.0f} s at {rate:.1f} req/s (80% of capacity), frontend RSS sampled")
    o = b.orchd(UNLIMITED, p.headline_conc * 2)
    try:
        s = _RssSampler(o)
        spec = LoadSpec(
            port=o.port, mode="rate", concurrency=0, request_rate=rate, max_tokens=p.tokens,
            warmup_s=10.0, duration_s=p.soak_s,
        )  # fmt: skip
        r = b.client.run(spec, "soak", b.slo, hooks=s)
        r["label"] = "soak"
        r["server_cpu_pct_by_role"] = s.by_role()
    finally:
        o.stop()
    rss = [v for _, v in s.samples]
    n = max(1, len(rss) // 10)
    first, last = statistics.median(rss[:n]), statistics.median(rss[-n:])
    drift = 100.0 * (last - first) / first if first else 0.0
    spread = 100.0 * (max(rss) - min(rss)) / first if first else 0.0
    b.results["soak"] = {"run": r, "rss_mb": s.samples, "drift_pct": drift, "spread_pct": spread}
    b.say(f"    {brief(r)}")
    b.row(
        f"frontend RSS drift over {p.soak_s:.0f} s at 80% capacity",
        drift,
        "%",
        target="within 5%",
        met=abs(drift) <= 5.0,
        note=f"first {first:.1f} MB, last {last:.1f} MB, max-min {spread:.1f}%",
        runs=[r],
    )
