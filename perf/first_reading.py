"""The pipeline's first reading (issue 2): streaming throughput against the ceiling server,
engine-write-to-client latency, and idle CPU. Every headline figure is a ratio to a baseline
measured in the same run.

    make bench                      # or: python -m perf.first_reading --streams 256 --tokens 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from perf import client
from perf.procs import Ceiling, Orchd, cpu_seconds

UNLIMITED = """
[limits]
queue_capacity = 4096
[[replicas]]
id = "r0"
slots = 256
[replicas.mock]
itl_ms = 0
ttft_ms = 0
[[replicas]]
id = "r1"
slots = 256
[replicas.mock]
itl_ms = 0
ttft_ms = 0
"""

PACED = """
[[replicas]]
id = "r0"
slots = 64
[replicas.mock]
itl_ms = {itl}
ttft_ms = 0
stamp_tokens = true
[[replicas]]
id = "r1"
slots = 64
[replicas.mock]
itl_ms = {itl}
ttft_ms = 0
stamp_tokens = true
"""


def machine() -> dict[str, object]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


def throughput(streams: int, tokens: int, rounds: int, shards: int) -> dict[str, object]:
    ceil_runs, orchd_runs = [], []
    o = Orchd(UNLIMITED)
    c = Ceiling()
    try:
        for _ in range(rounds):  # alternate, so drift on a noisy machine hits both alike
            ceil_runs.append(
                client.run(client.Target("127.0.0.1", c.port, "ceiling"), streams, tokens, shards)
            )
            procs = o.processes()
            roles = o.roles()
            cpu0 = cpu_seconds(procs)
            r = client.run(client.Target("127.0.0.1", o.port, "orchd"), streams, tokens, shards)
            cpu1 = cpu_seconds(procs)
            per_role: dict[str, float] = {}
            for pid, role in roles.items():
                per_role[role] = per_role.get(role, 0.0) + cpu1.get(pid, 0) - cpu0.get(pid, 0)
            r["cpu_pct_by_role"] = {k: round(100 * v / r["wall_s"], 1) for k, v in per_role.items()}
            orchd_runs.append(r)
    finally:
        c.stop()
        o.stop()
    best_c = max(x["events_per_s"] for x in ceil_runs)
    best_o = max(x["events_per_s"] for x in orchd_runs)
    return {
        "ceiling": ceil_runs,
        "orchd": orchd_runs,
        "ratio_best": best_o / best_c,
        "ratio_each": [
            o_["events_per_s"] / c_["events_per_s"]
            for o_, c_ in zip(orchd_runs, ceil_runs, strict=False)
        ],
    }


def latency_and_idle(streams: int, itl_ms: int, tokens: int, idle_s: float) -> dict[str, object]:
    o = Orchd(PACED.format(itl=itl_ms))
    try:
        time.sleep(2.0)  # let start-up settle before the idle window
        procs = o.processes()
        cpu0 = cpu_seconds(procs)
        t0 = time.monotonic()
        time.sleep(idle_s)
        cpu1 = cpu_seconds(procs)
        idle_pct = 100 * sum(cpu1[p] - cpu0.get(p, 0) for p in cpu1) / (time.monotonic() - t0)
        r = client.run(client.Target("127.0.0.1", o.port, "orchd"), streams, tokens, 2, stamps=True)
    finally:
        o.stop()
    return {"idle_cpu_pct_of_one_core": round(idle_pct, 3), "idle_window_s": idle_s, "paced": r}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--latency-streams", type=int, default=64)
    ap.add_argument("--itl-ms", type=int, default=20)
    ap.add_argument("--idle-s", type=float, default=10.0)
    a = ap.parse_args()
    out = {
        "machine": machine(),
        "throughput": throughput(a.streams, a.tokens, a.rounds, a.shards),
        "latency": latency_and_idle(a.latency_streams, a.itl_ms, 100, a.idle_s),
    }
    os.makedirs("perf/results", exist_ok=True)
    path = f"perf/results/first_reading-{time.strftime('%Y%m%d-%H%M%S')}.json"
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    t = out["throughput"]
    lat = out["latency"]["paced"]
    print(f"machine: {out['machine']}")
    for c_, o_ in zip(t["ceiling"], t["orchd"], strict=False):
        print(
            f"  ceiling {c_['events_per_s']:>10.0f} ev/s   orchd {o_['events_per_s']:>10.0f} ev/s"
            f"   orchd cpu% {o_['cpu_pct_by_role']}"
        )
    print(
        f"orchd / ceiling token events/s: best {t['ratio_best']:.2f}, each {[round(x, 2) for x in t['ratio_each']]}"
    )
    print(
        f"engine write -> client receipt at {a.latency_streams} streams x {1000 // a.itl_ms} tok/s: "
        f"p50 {lat.get('latency_us_p50', 0) / 1000:.2f} ms, p99 {lat.get('latency_us_p99', 0) / 1000:.2f} ms"
        f" ({lat.get('latency_samples', 0)} tokens)"
    )
    print(f"idle CPU, whole orchd tree: {out['latency']['idle_cpu_pct_of_one_core']}% of one core")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
