"""The load generator: drives orchd's HTTP API (or the ceiling server) from several client
processes, so that the client is not the bottleneck, and reports what each run measured.

Arrival patterns (:class:`LoadSpec.mode`):
  closed  fixed concurrency: C workers, each sends its next request when the last ended;
  rate    open loop: Poisson (burstiness 1) or gamma-distributed arrivals at a request rate,
          optionally capped by a max concurrency, as `vllm bench serve --request-rate`;
  admit   POST /v1/tasks only, C workers back to back (admission throughput).

Timeline of a run: warm-up (not measured) -> window (measured) -> drain: traffic goes on
unmeasured until every request sent inside the window has ended (or a cap), so the cohort
never sees a lighter load than the window had. Then every connection is closed.

    python -m perf.loadgen --port 8080 --concurrency 64 --max-tokens 256 --duration 10
    python -m perf.loadgen --port 8080 --request-rate 200 --burstiness 0.5 --duration 10

OpenAI-compatible servers (orchd's own routes, or any server by URL): one streamed
``POST /v1/chat/completions`` per request; its content deltas are the tokens, TTFT runs to
the first one, ``data: [DONE]`` ends it.

    python -m perf.loadgen --api openai --port 8080 --concurrency 64 --max-tokens 256
    python -m perf.loadgen --api openai --url http://127.0.0.1:4000/v1 --model mock:tiny --key sk-x
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import time
import urllib.parse
from dataclasses import asdict
from multiprocessing.connection import Connection
from typing import Any

from perf.metrics import Window, parse_slo, summarize
from perf.progress import Bar
from perf.shard import Hooks, LoadSpec, _shard_main

__all__ = ["Hooks", "LoadClient", "LoadSpec", "spec_fields"]

SATURATED = 0.8  # a client process busier than this share of one core may be the bottleneck


# ------------------------------------------------------------------------------ the client


class LoadClient:
    """Persistent client processes (spawned once), each running its share of every run."""

    def __init__(self, shards: int = 2) -> None:
        self.n = shards
        self._spawn()

    def _spawn(self) -> None:
        ctx = mp.get_context("spawn")
        shards = self.n
        self.progress = ctx.RawArray("d", shards * 4)
        self.pending = ctx.RawArray("q", shards)
        self.pipes: list[Connection] = []
        self.procs: list[Any] = []
        for i in range(shards):
            a, b = ctx.Pipe()
            p = ctx.Process(
                target=_shard_main, args=(b, i, shards, self.progress, self.pending), daemon=True
            )
            p.start()
            self.pipes.append(a)
            self.procs.append(p)

    def run(
        self,
        spec: LoadSpec,
        label: str,
        slo: dict[str, float] | None = None,
        hooks: Hooks | None = None,
    ) -> dict[str, Any]:
        try:
            return self._run(spec, label, slo, hooks)
        except Exception:
            self.close()  # shards may be mid-run: start afresh for the next run
            self._spawn()
            raise

    def _run(
        self,
        spec: LoadSpec,
        label: str,
        slo: dict[str, float] | None,
        hooks: Hooks | None,
    ) -> dict[str, Any]:
        for i in range(self.n):
            self.pending[i] = 0
            for j in range(4):
                self.progress[i * 4 + j] = 0
        t0 = time.monotonic() + 0.2
        for p in self.pipes:
            p.send((spec, t0))
        w0, w1 = t0 + spec.warmup_s, t0 + spec.warmup_s + spec.duration_s
        results: dict[int, tuple[Window, float]] = {}
        give_up = w1 + spec.drain_cap_s + 60.0
        bar = Bar(label, spec.warmup_s + spec.duration_s)
        phase = 0
        try:
            while len(results) < self.n:
                now = time.monotonic()
                if phase == 0 and now >= w0:
                    phase = 1
                    if hooks:
                        hooks.window_start()
                if phase == 1 and now >= w1:
                    phase = 2
                    if hooks:
                        hooks.window_end()
                if hooks:
                    hooks.tick(now)
                tok = sum(self.progress[i * 4] for i in range(self.n))
                done = sum(self.progress[i * 4 + 1] for i in range(self.n))
                bar.update(now - t0, tok, done, draining=phase == 2)
                for i, p in enumerate(self.pipes):
                    if i not in results and p.poll(0.05):
                        got = p.recv()
                        if isinstance(got, str):
                            raise RuntimeError(f"load client process {i} failed:\n{got}")
                        results[i] = got
                    elif i not in results and not self.procs[i].is_alive():
                        raise RuntimeError(f"load client process {i} died")
                if now > give_up:
                    raise RuntimeError("the load client did not finish its run")
        finally:
            bar.close()
        if phase < 2 and hooks:  # a run shorter than its window (should not happen)
            if phase == 0:
                hooks.window_start()
            hooks.window_end()
        win = Window(spec.duration_s, input_tokens_per_req=spec.input_len)
        cpus = []
        for i in range(self.n):
            w, cpu = results[i]
            win.merge(w)
            cpus.append(cpu / spec.duration_s)
        out = summarize(win, slo or parse_slo(None))
        out.update(spec_fields(spec))
        out["client_shards"] = self.n
        out["client_cpu_per_shard"] = [round(c, 3) for c in cpus]
        out["client_cpu_cores"] = round(sum(cpus), 3)
        busy = max(cpus) if cpus else 0.0
        out["client_saturated"] = busy > SATURATED or sum(cpus) > SATURATED * min(
            self.n, os.cpu_count() or 1
        )
        return out

    def close(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for proc in self.procs:
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(2)

    def __enter__(self) -> LoadClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spec_fields(spec: LoadSpec) -> dict[str, Any]:
    """The traffic keys of a vLLM result file, plus ours."""
    d = asdict(spec)
    return {
        "date": time.strftime("%Y%m%d-%H%M%S"),
        "endpoint_type": "openai-chat" if spec.api == "openai" else spec.target,
        "backend": spec.target,
        "api": spec.api,
        "model_id": spec.model,
        "tokenizer_id": None,
        "request_rate": spec.request_rate if spec.mode == "rate" else "inf",
        "burstiness": spec.burstiness,
        "max_concurrency": spec.concurrency or None,
        "mode": spec.mode,
        "warmup_s": spec.warmup_s,
        "max_tokens": d["max_tokens"],
        "input_len": d["input_len"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description="Drive a running orchd (or ceiling) server.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--key", default="dev")
    ap.add_argument("--target", default="orchd", help="orchd | ceiling (native API); a label")
    ap.add_argument("--api", choices=["native", "openai"], default="native")
    ap.add_argument("--url", help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:4000/v1")
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    ap.add_argument("--model", default="mock:tiny", help="the OpenAI body's model")
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--request-rate", type=float, default=0.0, help="0: closed loop")
    ap.add_argument("--burstiness", type=float, default=1.0)
    ap.add_argument("--admit-only", action="store_true", help="POST /v1/tasks only")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=8)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--stamps", action="store_true")
    ap.add_argument("--goodput", nargs="*", help="SLOs as ttft:MS tpot:MS e2el:MS")
    ap.add_argument("--out", help="write the result JSON here")
    a = ap.parse_args()
    path = "/v1"
    if a.url:
        u = urllib.parse.urlsplit(a.url)
        if u.scheme != "http" or not u.hostname:
            ap.error("--url takes a plain http:// base URL (the client speaks no TLS)")
        a.host, a.port, a.api = u.hostname, u.port or 80, "openai"
        path = u.path.rstrip("/") or ""
        if a.target == "orchd":
            a.target = "url"
    if a.api == "openai" and a.admit_only:
        ap.error("--admit-only is orchd's native POST /v1/tasks")
    path += "/chat/completions" if a.endpoint == "chat" else "/completions"
    mode = "admit" if a.admit_only else ("rate" if a.request_rate > 0 else "closed")
    spec = LoadSpec(
        port=a.port, target=a.target, host=a.host, key=a.key, mode=mode,
        concurrency=a.concurrency if mode != "rate" or a.concurrency else 0,
        request_rate=a.request_rate, burstiness=a.burstiness, max_tokens=a.max_tokens,
        input_len=a.input_len, warmup_s=a.warmup, duration_s=a.duration, stamps=a.stamps,
        api=a.api, path=path, model=a.model,
    )  # fmt: skip
    with LoadClient(a.shards) as client:
        out = client.run(spec, f"{a.target} {a.api} {mode}", parse_slo(a.goodput))
    text = json.dumps(out, indent=2)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
