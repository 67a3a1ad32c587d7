"""The torch engine inside orchd against its own decode loop run directly: same model, batch,
prompt and length. orchd's cost is one minus the ratio of the two token rates (target < 3 %).
While orchd decodes it scrapes ``/metrics`` and reports the highest ``gpu_utilization`` and
``vram_used_bytes`` it saw, so a GPU host shows them moving.

    python -m perf.torch_engine --model random:1b --batch 64 --tokens 256        # a GPU host
    python -m perf.torch_engine --model random:tiny --device cpu --batch 8 --tokens 32  # smoke

**direct** drives ``TorchEngineProcess.step`` in this process, with no socket: the engine's
own loop (prefill, decode, detokenize) and nothing else. **orchd** starts ``orchd serve`` with
one torch replica (the same engine process), submits ``batch`` tasks at once over HTTP and
reads their SSE streams; its rate is the tokens received over the time from the first submit
to the last ``end``. Each is run ``--rounds`` times, alternating, and the best of each kept.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from typing import Any

import httpx

from perf.procs import Orchd


def direct_rate(args: argparse.Namespace) -> float:
    import torch

    from engine_procs import torch_models
    from engine_procs.torch_engine import TorchEngineProcess
    from ipc import protocol as p
    from orchd.config import TorchEngine

    cfg = TorchEngine(device=args.device, max_batch=args.batch, max_seq_len=args.max_seq_len)
    device = torch_models.pick_device(cfg.device)
    loaded = torch_models.load(args.model, device, torch_models.pick_dtype(cfg.dtype, device), 0)
    engine = TorchEngineProcess("inproc://direct", cfg, loaded, "direct")

    def run(n: int, tokens: int) -> float:
        for rid in range(n):
            engine.handle(p.EngSubmit(rid, prompt(rid), seed=rid, max_tokens=tokens))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        done = 0
        while done < n:
            done += len(engine.step().finished)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    run(min(4, args.batch), 8)  # warm-up: kernels, allocator
    elapsed = run(args.batch, args.tokens)
    engine.sock.close(0)
    engine.ctx.term()
    return args.batch * args.tokens / elapsed


def _free_gpu_memory() -> None:
    """What the direct run held goes back to the driver before orchd's engine loads."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def prompt(i: int) -> str:
    return f"request {i:04d}: the quick brown fox jumps over the lazy dog"


def config(args: argparse.Namespace) -> str:
    return f"""
[[replicas]]
id = "gpu0"
pool_id = "torch"
engine = "torch"
model_ref = "{args.model}"
slots = {args.batch}
devices = "{args.devices}"
[replicas.endpoint]
ready_timeout_s = 600
[replicas.torch]
device = "{args.device}"
max_batch = {args.batch}
max_seq_len = {args.max_seq_len}
"""


async def orchd_run(port: int, args: argparse.Namespace, n: int, tokens: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    headers = {"X-API-Key": "dev"}
    gauges: dict[str, float] = {}
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=600, limits=limits) as c:

        async def one(i: int) -> int:
            body = {
                "task_id": f"t-{time.monotonic_ns()}-{i}",
                "session_id": f"s-{i}",
                "workload": "completion",
                "model_ref": args.model,
                "engine": "torch",
                "ctx": args.max_seq_len,
                "priority": "batch",
                "max_tokens": tokens,
                "deadline_ms": 3_600_000,
                "seed": i,
                "prompt": prompt(i),
            }
            r = await c.post("/v1/tasks", json=body)
            r.raise_for_status()
            got = 0
            async with c.stream("GET", f"/v1/tasks/{body['task_id']}/stream") as s:
                async for line in s.aiter_lines():
                    if line == "event: token":
                        got += 1
                    elif line in ("event: end", "event: error"):
                        break
            return got

        async def scrape(stop: asyncio.Event) -> None:
            while not stop.is_set():
                text = (await c.get("/metrics")).text
                for name in ("gpu_utilization", "vram_used_bytes"):
                    for m in re.finditer(rf"^{name}{{[^}}]*}} ([0-9.e+]+)$", text, re.M):
                        gauges[name] = max(gauges.get(name, 0.0), float(m.group(1)))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 0.5)

        stop = asyncio.Event()
        scraper = asyncio.create_task(scrape(stop))
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(n)))
        elapsed = time.perf_counter() - t0
        stop.set()
        await scraper
    return {"tokens": sum(counts), "elapsed_s": elapsed, "gauges": gauges}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:1b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--devices", default="0", help="CUDA_VISIBLE_DEVICES of the replica")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--max-seq-len", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="", help="write the result as JSON here too")
    args = ap.parse_args(argv)

    direct: list[float] = []
    served: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        direct.append(direct_rate(args))
        _free_gpu_memory()
        print(f"direct: {direct[-1]:.0f} tokens/s", file=sys.stderr)
        o = Orchd(config(args))
        try:
            asyncio.run(orchd_run(o.port, args, min(4, args.batch), 8))  # warm-up
            run = asyncio.run(orchd_run(o.port, args, args.batch, args.tokens))
        finally:
            o.stop()
        run["rate"] = run["tokens"] / run["elapsed_s"]
        served.append(run)
        print(f"orchd:  {run['rate']:.0f} tokens/s  {run['gauges']}", file=sys.stderr)
    best = max(served, key=lambda r: r["rate"])
    expected = args.batch * args.tokens
    result = {
        "model": args.model,
        "device": args.device,
        "batch": args.batch,
        "tokens": args.tokens,
        "direct_tokens_per_s": max(direct),
        "orchd_tokens_per_s": best["rate"],
        "ratio": best["rate"] / max(direct),
        "orchd_cost_pct": 100.0 * (1.0 - best["rate"] / max(direct)),
        "tokens_received": best["tokens"],
        "tokens_expected": expected,
        "max_gpu_utilization": best["gauges"].get("gpu_utilization"),
        "max_vram_used_bytes": best["gauges"].get("vram_used_bytes"),
        "rounds": {"direct": direct, "orchd": [r["rate"] for r in served]},
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if best["tokens"] == expected else 1


if __name__ == "__main__":
    sys.exit(main())
