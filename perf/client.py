"""The load client: many concurrent SSE streams on raw asyncio protocols, sharded over
processes so that the client is not the bottleneck (it reports its own CPU time)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import time
import uuid
from dataclasses import dataclass, field

MARK = b"event: token"
DONE = b"\r\n0\r\n\r\n"


@dataclass
class Target:
    host: str
    port: int
    kind: str  # "orchd" | "ceiling"
    key: str = "dev"


@dataclass
class ShardResult:
    events: int = 0
    streams: int = 0
    failed: int = 0
    t_first: float = 0.0  # monotonic s, first stream opened
    t_last: float = 0.0  # monotonic s, last stream ended
    latencies_us: list[int] = field(default_factory=list)
    cpu_s: float = 0.0


class _Stream(asyncio.Protocol):
    def __init__(self, req: bytes, stamps: bool, res: ShardResult) -> None:
        self.req = req
        self.stamps = stamps
        self.res = res
        self.tail = b""
        self.frames = b""
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.req)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.stamps:
            now = time.monotonic_ns()
            self.frames += data
            parts = self.frames.split(b"\n\n")
            self.frames = parts.pop()
            for f in parts:
                i = f.find(b'data: {"t":"')
                if i >= 0 and MARK in f:
                    t = int(f[i + 12 : f.index(b'"', i + 12)])
                    self.res.latencies_us.append((now - t) // 1000)
                    self.res.events += 1
        joined = self.tail + data
        if not self.stamps:
            # The tail is one byte shorter than MARK: a mark split across reads counts once.
            self.res.events += joined.count(MARK)
        self.tail = joined[-(len(MARK) - 1) :]
        if DONE in joined and not self.done.done():
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


def _req(method: str, path: str, t: Target, body: bytes | None = None) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {t.host}\r\nX-API-Key: {t.key}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


async def _submit(t: Target, body: dict) -> bool:
    reader, writer = await asyncio.open_connection(t.host, t.port)
    writer.write(_req("POST", "/v1/tasks", t, json.dumps(body).encode()))
    head = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    return b" 202 " in head.split(b"\r\n", 1)[0]


async def _one(t: Target, tokens: int, stamps: bool, res: ShardResult, seed: int) -> None:
    loop = asyncio.get_running_loop()
    if t.kind == "ceiling":
        path = f"/stream/{tokens}"
    else:
        tid = f"bench-{uuid.uuid4().hex[:12]}"
        body = {
            "task_id": tid, "session_id": tid, "workload": "completion",
            "model_ref": "mock:tiny", "engine": "mock", "ctx": 2048, "priority": "interactive",
            "max_tokens": tokens, "deadline_ms": 600000, "seed": seed, "prompt": "bench",
        }  # fmt: skip
        if not await _submit(t, body):
            res.failed += 1
            return
        path = f"/v1/tasks/{tid}/stream"
    proto = _Stream(_req("GET", path, t), stamps, res)
    await loop.create_connection(lambda: proto, t.host, t.port)
    await proto.done
    assert proto.transport is not None
    proto.transport.close()
    res.streams += 1


async def _shard(t: Target, streams: int, tokens: int, stamps: bool, offset: int) -> ShardResult:
    res = ShardResult()
    cpu0 = time.process_time()
    res.t_first = time.monotonic()
    await asyncio.gather(*(_one(t, tokens, stamps, res, offset + i) for i in range(streams)))
    res.t_last = time.monotonic()
    res.cpu_s = time.process_time() - cpu0
    return res


def _run_shard(args: tuple[Target, int, int, bool, int]) -> ShardResult:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    return asyncio.run(_shard(*args))


def run(t: Target, streams: int, tokens: int, shards: int = 2, stamps: bool = False) -> dict:
    per = [streams // shards + (1 if i < streams % shards else 0) for i in range(shards)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(shards) as pool:
        results = pool.map(
            _run_shard, [(t, n, tokens, stamps, i * 100000) for i, n in enumerate(per)]
        )
    t0 = min(r.t_first for r in results)
    t1 = max(r.t_last for r in results)
    events = sum(r.events for r in results)
    lat = sorted(x for r in results for x in r.latencies_us)
    out = {
        "streams": sum(r.streams for r in results),
        "failed": sum(r.failed for r in results),
        "events": events,
        "wall_s": t1 - t0,
        "events_per_s": events / (t1 - t0) if t1 > t0 else 0.0,
        "client_cpu_s": sum(r.cpu_s for r in results),
        "client_cores": os.cpu_count(),
    }
    if lat:
        out["latency_us_p50"] = lat[len(lat) // 2]
        out["latency_us_p99"] = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        out["latency_samples"] = len(lat)
    return out
