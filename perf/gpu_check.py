"""The GPU-host check (issue 16), in one go: ``perf/gpu_check.sh OUT`` (or ``make gpu-check``).

A GPU host is lent for about 15 minutes at a time, with no network, so this is one prepared
command. It assumes Python 3.12 with torch, transformers, nvidia-ml-py, prometheus-client, numpy
and uvloop, and takes whatever else orchd and its tests import from the wheels that
``make gpu-wheels`` fetched beforehand (``.gpu-wheels/``, unpacked into a temporary folder: no
pip, no network). Then, each step with its own time cap so the whole stays under 8 minutes:

1. ``tests``: the gpu-marked tests (NVML through the collector; the torch engine on the GPU with
   the gauges moving);
2. ``torch``: ``perf.torch_engine --model random:1b --batch 64 --tokens 256``: orchd's cost over
   the engine's own loop (target < 3 %), and the highest ``gpu_utilization`` /
   ``vram_used_bytes`` that ``/metrics`` showed during that run (the NVML gauges moving);
3. ``bench``: the scale-out sweep with 1, 2, 4 and 8 frontends on the mock engine (target: 4
   frontends >= 3 x one) and the latency scenario (TTFT p50 over direct, target <= +0.5 ms
   where no process waits for a core).

It writes ``gpu-check.json`` (host, every step's status and output tail, the figures, each
target met or not) and ``gpu-check.txt`` (a short summary) into OUT, and each step's full output
under ``OUT/logs/``. ``--cpu`` rehearses every step on a machine with no GPU: the gpu tests are
collected and skipped, the torch engine runs a tiny model on the CPU, the sweep is 1 and 2
frontends with short windows; the figures then mean nothing, the command lines everything.
Exit status 0 when every step ran and ended well (a target not met is a finding, not a failure).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 470.0  # the 8 minutes, less the start and the write-up
# What orchd and its gpu tests import beyond what a GPU host has (module names); the wheels
# folder holds these and their dependencies (Makefile: gpu-wheels).
NEEDED = [
    "uvicorn", "starlette", "httptools", "posix_ipc", "zmq", "psutil", "msgspec", "httpx",
    "pytest", "pytest_timeout", "yaml", "jsonschema",
]  # fmt: skip
HOST_HAS = ["torch", "transformers", "pynvml", "prometheus_client", "numpy", "uvloop"]
TAIL_LINES = 40


@dataclass
class Step:
    name: str
    argv: list[str]
    cap_s: float
    status: str = "not run"  # ok | failed | timed out | not run
    rc: int | None = None
    elapsed_s: float = 0.0
    tail: list[str] = field(default_factory=list)


def missing_modules(names: list[str]) -> list[str]:
    code = (
        "import importlib.util as u, sys\n"
        "print(' '.join(n for n in sys.argv[1:] if u.find_spec(n) is None))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *names], capture_output=True, text=True, check=True
    )
    return out.stdout.split()


def unpack_wheels(wheels: Path, site: Path) -> list[str]:
    """Unpack every wheel into ``site`` (a wheel is a zip of its import tree; none of ours has
    a ``.data`` folder or needs its scripts). Returns the wheel names."""
    names = sorted(p.name for p in wheels.glob("*.whl"))
    if not names:
        raise SystemExit(f"no wheels in {wheels}: run `make gpu-wheels` on a networked machine")
    site.mkdir(parents=True, exist_ok=True)
    for name in names:
        with zipfile.ZipFile(wheels / name) as z:
            z.extractall(site)
    return names


def host_info() -> dict[str, Any]:
    code = r"""
import json, os, platform
info = {"python": platform.python_version(), "cores": os.cpu_count()}
try:
    import torch
    info["torch"] = torch.__version__
    info["cuda"] = torch.version.cuda
    info["cuda_available"] = torch.cuda.is_available()
except Exception as e:
    info["torch"] = f"unavailable: {e}"
try:
    import pynvml
    pynvml.nvmlInit()
    info["driver"] = pynvml.nvmlSystemGetDriverVersion()
    gpus = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        mem = pynvml.nvmlDeviceGetMemoryInfo(h)
        gpus.append({"name": pynvml.nvmlDeviceGetName(h), "memory_bytes": int(mem.total)})
    info["gpus"] = gpus
    pynvml.nvmlShutdown()
except Exception as e:
    info["gpus"] = []
    info["nvml"] = f"unavailable: {type(e).__name__}: {e}"
print(json.dumps(info, default=str))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    try:
        info: dict[str, Any] = json.loads(out.stdout)
    except ValueError:
        info = {"error": out.stderr[-500:]}
    info["cpu"] = platform.processor() or platform.machine()
    return info


def run_step(step: Step, env: dict[str, str], logs: Path, deadline: float) -> None:
    cap = max(1.0, min(step.cap_s, deadline - time.monotonic()))
    log = logs / f"{step.name}.log"
    print(f"[{step.name}] {' '.join(step.argv)} (cap {cap:.0f} s)", flush=True)
    t0 = time.monotonic()
    with log.open("w") as f:
        f.write(f"$ {' '.join(step.argv)}\n")
        f.flush()
        proc = subprocess.Popen(
            step.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            step.rc = proc.wait(cap)
            step.status = "ok" if step.rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)  # the step's whole process group: orchd, its engines
            proc.wait()
            step.status = "timed out"
    step.elapsed_s = round(time.monotonic() - t0, 1)
    step.tail = log.read_text(errors="replace").splitlines()[-TAIL_LINES:]
    print(f"[{step.name}] {step.status} in {step.elapsed_s:.0f} s", flush=True)


def steps(cpu: bool, py: str, logs: Path) -> list[Step]:
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/gpu"]
    torch = [py, "-m", "perf.torch_engine", "--out", str(logs / "torch.json")]
    bench = [py, "-m", "perf.bench", "--only", "scale,latency", "--out", str(logs / "bench")]
    if cpu:
        torch += ["--model", "random:tiny", "--device", "cpu", "--batch", "4", "--tokens", "16"]
        torch += ["--rounds", "1"]
        bench += ["--frontends", "1,2", "--sweep", "16", "--duration", "1", "--shards", "1"]
    else:
        torch += ["--model", "random:1b", "--batch", "64", "--tokens", "256"]
        bench += ["--frontends", "1,2,4,8", "--duration", "5", "--shards", "4"]
    return [Step("tests", tests, 120.0), Step("torch", torch, 180.0), Step("bench", bench, 160.0)]


def pytest_counts(tail: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for line in tail[-3:]:
        for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", line):
            counts[what] = int(n)
    return counts


def figures(cpu: bool, logs: Path, by_name: dict[str, Step]) -> tuple[dict[str, Any], list[dict]]:
    figs: dict[str, Any] = {}
    targets: list[dict[str, Any]] = []
    counts = pytest_counts(by_name["tests"].tail)
    figs["gpu_tests"] = counts
    if (
        cpu
        and by_name["tests"].status == "ok"
        and counts.get("skipped")
        and not counts.get("passed")
    ):
        by_name["tests"].status = "ok (collected, skipped: no GPU)"
    torch_json = logs / "torch.json"
    if torch_json.exists():
        t = json.loads(torch_json.read_text())
        figs["torch"] = t
        targets.append(
            target(
                "orchd_cost_pct (torch engine)",
                round(t["orchd_cost_pct"], 2),
                "< 3 %",
                t["orchd_cost_pct"] < 3.0,
                cpu,
            )
        )
        util, vram = t.get("max_gpu_utilization"), t.get("max_vram_used_bytes")
        moving = bool(util and util > 0 and vram and vram > 0)
        targets.append(
            target(
                "NVML gauges moved under load (max gpu_utilization %, VRAM)",
                f"{util} %, {vram} bytes",
                "> 0 during the run",
                moving,
                cpu,
            )
        )
    bench = sorted((logs / "bench").glob("bench-*.json")) if (logs / "bench").exists() else []
    if bench:
        b = json.loads(bench[-1].read_text())
        figs["bench_file"] = str(bench[-1].relative_to(logs.parent))
        figs["bench_headline"] = b.get("headline", [])
        figs["bench_errors"] = b.get("errors", {})
        runs = b.get("results", {}).get("scale_out", {}).get("runs", [])
        figs["scale_out_events_per_s"] = {r["frontends"]: r["token_events_per_s"] for r in runs}
        one = figs["scale_out_events_per_s"].get(1)
        four = figs["scale_out_events_per_s"].get(4)
        if one and four:
            targets.append(
                target(
                    "scale-out, 4 frontends / 1",
                    round(four / one, 2),
                    ">= 3 x",
                    four >= 3 * one,
                    cpu,
                )
            )
        lat = b.get("results", {}).get("latency", {})
        if lat:
            delta = lat["orchd"]["median_ttft_ms"] - lat["direct"]["median_ttft_ms"]
            figs["ttft_p50_over_direct_ms"] = round(delta, 3)
            figs["ttft_p50_ms"] = {k: lat[k]["median_ttft_ms"] for k in ("orchd", "direct")}
            targets.append(
                target(
                    "TTFT p50 over direct (64 streams)",
                    round(delta, 3),
                    "<= +0.5 ms on 16 cores",
                    delta <= 0.5,
                    cpu,
                )
            )
    return figs, targets


def target(name: str, value: Any, goal: str, met: bool, cpu: bool) -> dict[str, Any]:
    """A target row; on the CPU rehearsal it is never scored (the figures mean nothing)."""
    return {"name": name, "value": value, "target": goal, "met": None if cpu else met}


def summary(result: dict[str, Any]) -> str:
    host = result["host"]
    gpus = ", ".join(g["name"] for g in host.get("gpus", [])) or "no GPU"
    mode = "CPU rehearsal (--cpu): figures are not GPU-host figures" if result["cpu"] else "GPU"
    lines = [
        f"orchd GPU-host check, {result['date']}, {mode}",
        f"host: {host.get('cores')} cores, {gpus}, driver {host.get('driver', '-')}, "
        f"Python {host.get('python')}, torch {host.get('torch')} (CUDA {host.get('cuda')})",
        f"orchd {result['orchd_rev']}; {result['elapsed_s']:.0f} s in all"
        + (f"; wheels unpacked: {len(result['wheels'])}" if result["wheels"] else ""),
        "",
    ]
    for s in result["steps"]:
        lines.append(f"step {s['name']}: {s['status']} ({s['elapsed_s']:.0f} s, rc {s['rc']})")
    lines.append("")
    for t in result["targets"]:
        mark = {True: "met", False: "NOT met", None: "not scored"}[t["met"]]
        lines.append(f"{t['name']}: {t['value']}; target {t['target']} [{mark}]")
    f = result["figures"]
    if "torch" in f:
        t = f["torch"]
        lines.append(
            f"torch engine: direct {t['direct_tokens_per_s']:.0f} tok/s, orchd "
            f"{t['orchd_tokens_per_s']:.0f} tok/s ({t['model']}, batch {t['batch']}, "
            f"{t['tokens']} tokens)"
        )
    if f.get("scale_out_events_per_s"):
        per = ", ".join(f"{k} fe {v:.0f}" for k, v in f["scale_out_events_per_s"].items())
        lines.append(f"scale-out token events/s: {per}")
    if "ttft_p50_ms" in f:
        p = f["ttft_p50_ms"]
        lines.append(f"TTFT p50: orchd {p['orchd']:.2f} ms, direct {p['direct']:.2f} ms")
    lines.append("")
    lines.append("result: " + ("PASS" if result["ok"] else "FAIL"))
    return "\n".join(lines) + "\n"


def git_rev() -> str:
    out = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout.strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="perf/gpu_check.sh",
        description=__doc__.split("\n\n")[0],
        epilog="Details: the docstring of perf/gpu_check.py.",
    )
    ap.add_argument("out", help="folder for gpu-check.json, gpu-check.txt and logs/")
    ap.add_argument("--cpu", action="store_true", help="rehearse on a machine with no GPU")
    ap.add_argument("--wheels", default=str(ROOT / ".gpu-wheels"), help="the wheels folder")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all steps")
    a = ap.parse_args(argv)
    t_begin = time.monotonic()
    out = Path(a.out).resolve()
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    paths = [str(ROOT)]
    wheels: list[str] = []
    lacking = missing_modules(NEEDED)
    if lacking:
        site = Path(tempfile.mkdtemp(prefix="orchd-gpu-site-"))
        print(f"unpacking wheels from {a.wheels} into {site} (missing: {' '.join(lacking)})")
        wheels = unpack_wheels(Path(a.wheels), site)
        paths.insert(0, str(site))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    probe = subprocess.run(
        [sys.executable, "-c", "import " + ",".join(NEEDED + HOST_HAS)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        why = (probe.stderr.strip().splitlines() or ["?"])[-1]
        print(f"cannot run: {why}", file=sys.stderr)
        return 2

    host = host_info()
    if not a.cpu and not host.get("cuda_available"):
        print("no CUDA device visible to torch: run with --cpu to rehearse", file=sys.stderr)
        return 2
    deadline = t_begin + a.budget
    plan = steps(a.cpu, sys.executable, logs)
    for step in plan:
        if time.monotonic() >= deadline:
            step.status = "not run (time budget spent)"
            continue
        run_step(step, env, logs, deadline)
    by_name = {s.name: s for s in plan}
    figs, targets = figures(a.cpu, logs, by_name)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "cpu": a.cpu,
        "orchd_rev": git_rev(),
        "host": host,
        "wheels": wheels,
        "elapsed_s": round(time.monotonic() - t_begin, 1),
        "steps": [s.__dict__ for s in plan],
        "figures": figs,
        "targets": targets,
        "ok": all(s.status.startswith("ok") for s in plan),
    }
    (out / "gpu-check.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    text = summary(result)
    (out / "gpu-check.txt").write_text(text)
    print()
    print(text, end="")
    print(f"written: {out / 'gpu-check.json'}, {out / 'gpu-check.txt'}, {logs}/")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
