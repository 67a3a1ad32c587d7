"""orchd's benchmark: every scenario of issue 4 next to its baseline, measured in one run.

    make bench                        # quick profile, < 5 min on 2 cores
    make bench-full                   # the complete sweep, soak included
    make bench-openai                 # issue 11: OpenAI routes vs native, vs LiteLLM
    python -m perf.bench --api openai --only sweep,latency   # the scenarios via OpenAI routes
    python -m perf.bench --profile quick --only sweep,latency --sweep 64,256 --duration 4
    python -m perf.bench --coalesce-toml '[replica]
    stream_interval = 8'              # once orchd has a coalescing setting

Results: perf/results/bench-<profile>-<timestamp>.json (vLLM-keyed runs, headline rows,
machine description) and .png (the sweep). Field definitions: perf/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
import tomllib
from dataclasses import replace
from typing import Any

from perf import oa_scenario, resources
from perf.loadgen import LoadClient
from perf.metrics import parse_slo
from perf.plot import sweep_png
from perf.scenarios import PROFILES, Bench

SCENARIOS = [
    "sweep", "coalesce", "latency", "admission", "arrivals", "idle", "scale", "memory", "soak",
    "openai",
]  # fmt: skip
# Run only when named (or with --api openai): it installs LiteLLM on first use (minutes).
NOT_BY_DEFAULT = {"openai"}


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": cpu,
        "memory_mb": mem,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


# orchd's stream_interval: first token at once, then every 16 tokens or 20 ms.
DEFAULT_COALESCE = "[scheduling]\nstream_interval_tokens = 16\nstream_interval_ms = 20\n"


def _coalesce(arg: str | None) -> dict[str, Any] | None:
    if not arg:
        return None
    if arg.startswith("@"):
        with open(arg[1:]) as f:
            arg = f.read()
    return tomllib.loads(arg)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # orchd inherits it too


def _capacity(b: Bench, given: float) -> float:
    if given > 0:
        return given
    runs = b.results.get("sweep", {}).get("orchd", [])
    at = [r["request_throughput"] for r in runs if r["concurrency"] == b.p.headline_conc]
    return sorted(at)[len(at) // 2] if at else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    ap.add_argument("--only", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--skip", help="comma-separated scenarios to leave out")
    ap.add_argument("--shards", type=int, default=2, help="load client processes")
    ap.add_argument("--replicas", type=int, default=2, help="mock replicas (and direct engines)")
    ap.add_argument("--goodput", nargs="*", help="SLOs as ttft:MS tpot:MS e2el:MS")
    ap.add_argument("--coalesce-toml", default=DEFAULT_COALESCE,
                    help="extra orchd config (TOML text or @file; a [replica] table applies to"
                    " every replica) for the coalescing scenario")  # fmt: skip
    ap.add_argument("--sweep", help="concurrency levels, e.g. 16,64,256")
    ap.add_argument("--tokens", type=int, help="max_tokens of the throughput runs")
    ap.add_argument("--duration", type=float, help="measurement window of each run (s)")
    ap.add_argument("--capacity", type=float, default=0.0, help="req/s for arrivals/soak")
    ap.add_argument("--soak", type=float, help="soak length (s); 0 skips it")
    ap.add_argument(
        "--api",
        choices=["native", "openai"],
        default="native",
        help="openai: the stream scenarios drive orchd's /v1/chat/completions"
        " (admission, memory and soak stay native), and the openai scenario runs",
    )
    ap.add_argument("--url", help="openai scenario: also drive this OpenAI-compatible base URL")
    ap.add_argument("--url-key", default="dev", help="the bearer key for --url")
    ap.add_argument("--url-model", default="mock:tiny", help="the model for --url")
    ap.add_argument("--frontends", help="frontend counts of the scale-out runs, e.g. 1,2,4,8")
    ap.add_argument("--out", default="perf/results")
    a = ap.parse_args(argv)

    prof = PROFILES[a.profile]
    if a.sweep:
        prof = replace(prof, sweep=[int(x) for x in a.sweep.split(",")])
        if prof.headline_conc not in prof.sweep:
            prof = replace(prof, headline_conc=max(prof.sweep))
    if a.tokens:
        prof = replace(prof, tokens=a.tokens)
    if a.duration:
        prof = replace(prof, duration_s=a.duration, lat_duration_s=a.duration)
    if a.soak is not None:
        prof = replace(prof, soak_s=a.soak)
    if a.frontends:
        prof = replace(prof, scale_frontends=[int(x) for x in a.frontends.split(",")])
    default = [s for s in SCENARIOS if s not in NOT_BY_DEFAULT or a.api == "openai"]
    chosen = a.only.split(",") if a.only else default
    chosen = [s for s in chosen if s not in (a.skip or "").split(",")]
    unknown = set(chosen) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenarios {sorted(unknown)}; known: {SCENARIOS}")
    slo = parse_slo(a.goodput)
    _raise_fd_limit()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    os.makedirs(a.out, exist_ok=True)
    base = os.path.join(a.out, f"bench-{a.profile}-{stamp}")
    mach = machine()
    t_begin = time.monotonic()
    print(f"orchd bench, profile {a.profile}, {git_rev()}; scenarios {','.join(chosen)}")
    print(f"machine: {mach['cores']} cores, {mach['cpu']}, Python {mach['python']}")
    print(f"goodput SLO (ms): {slo}; client: {a.shards} processes; replicas: {a.replicas}; "
          f"api: {a.api}")  # fmt: skip

    errors: dict[str, str] = {}
    with LoadClient(a.shards) as client:
        b = Bench(
            prof, client, slo, a.replicas, _coalesce(a.coalesce_toml), api=a.api, url=a.url,
            url_key=a.url_key, url_model=a.url_model,
        )  # fmt: skip
        steps = {
            "sweep": b.sweep,
            "coalesce": b.coalesced,
            "latency": b.latency,
            "admission": b.admission,
            "arrivals": lambda: b.arrivals(_capacity(b, a.capacity)),
            "idle": lambda: resources.idle(b),
            "scale": b.scale_out,
            "memory": lambda: resources.memory(b),
            "soak": lambda: resources.soak(b, _capacity(b, a.capacity)),
            "openai": lambda: oa_scenario.run(b),
        }
        for name in chosen:
            t0 = time.monotonic()
            try:
                steps[name]()
            except Exception as e:  # one broken scenario must not lose the others
                errors[name] = f"{type(e).__name__}: {e}"
                print(f"  [{name}] FAILED: {errors[name]}")
            print(f"  ({name}: {time.monotonic() - t0:.0f} s)", file=sys.stderr)

    out = {
        "date": stamp,
        "profile": a.profile,
        "profile_settings": prof.__dict__,
        "argv": sys.argv[1:] if argv is None else argv,
        "orchd_rev": git_rev(),
        "machine": mach,
        "client_shards": a.shards,
        "api": a.api,
        "goodput_slo_ms": slo,
        "headline": b.headline,
        "results": b.results,
        "errors": errors,
        "elapsed_s": round(time.monotonic() - t_begin, 1),
    }
    with open(base + ".json", "w") as f:
        json.dump(out, f, indent=1, default=str)
    png = None
    if "sweep" in b.results:
        title = f"orchd sweep ({a.profile}, {prof.tokens} tok/req) on {mach['cores']} cores"
        if sweep_png(b.results["sweep"], base + ".png", title):
            png = base + ".png"

    print()
    print(f"==== summary: profile {a.profile}, {out['elapsed_s']:.0f} s ====")
    for r in b.headline:
        if r["value"] is None:
            print(f"{r['name']}: not run; target {r['target'] or '-'} ({r['note']})")
            continue
        rel = ""
        if "ratio" in r:
            rel = f" = {r['ratio']} x {r['baseline']:.6g}"
        elif "delta" in r:
            rel = f" = {r['baseline']:.6g} {r['delta']:+.3f}"
        mark = {True: "met", False: "NOT met", None: "-"}[r["met"]]
        note = f" ({r['note']})" if r["note"] else ""
        print(f"{r['name']}: {r['value']:.6g} {r['unit']}{rel}; target {r['target'] or '-'} "
              f"[{mark}]{note}")  # fmt: skip
    sat = [
        r.get("label")
        for runs in b.results.get("sweep", {}).values()
        for r in runs
        if r.get("client_saturated")
    ]
    if sat:
        print(f"WARNING: the load client was saturated in: {sat}")
    for name, err in errors.items():
        print(f"scenario {name} failed: {err}")
    if png:
        print(f"results: {base}.json {png}")
    else:
        why = "no sweep in this run" if "sweep" not in b.results else "pip install '.[bench]'"
        print(f"results: {base}.json (no PNG: {why})")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
