"""The GPU-host check must not fail on a typo when a GPU host is finally at hand: the script
parses, answers ``--help``, plans the issue's exact commands, and scores the figures only a GPU
run produces (here from made-up step outputs)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

from perf import gpu_check

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "perf" / "gpu_check.sh"


def test_the_script_parses_and_answers_help() -> None:
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0
    out = subprocess.run(
        ["bash", str(SCRIPT), "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    assert out.returncode == 0, out.stderr
    assert "usage: perf/gpu_check.sh [--cpu]" in out.stdout and "make gpu-wheels" in out.stdout
    py = subprocess.run(
        [sys.executable, "-m", "perf.gpu_check", "--help"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert py.returncode == 0 and "--cpu" in py.stdout


def test_the_gpu_plan_runs_the_issues_commands(tmp_path: Path) -> None:
    plan = {s.name: s for s in gpu_check.steps(False, "python3", tmp_path)}
    assert list(plan) == ["tests", "torch", "bench"]
    assert plan["tests"].argv[-3:] == ["-m", "gpu", "tests/gpu"]
    torch = " ".join(plan["torch"].argv)
    assert "-m perf.torch_engine" in torch
    assert "--model random:1b --batch 64 --tokens 256" in torch
    bench = " ".join(plan["bench"].argv)
    assert "--only scale,latency" in bench and "--frontends 1,2,4,8" in bench
    assert sum(s.cap_s for s in plan.values()) <= gpu_check.BUDGET_S < 8 * 60


def _step(name: str, tail: list[str]) -> gpu_check.Step:
    return gpu_check.Step(name, [], 1.0, status="ok", rc=0, tail=tail)


def test_gpu_figures_are_scored_against_the_issues_targets(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    (logs / "bench").mkdir(parents=True)
    torch = {
        "model": "random:1b",
        "batch": 64,
        "tokens": 256,
        "direct_tokens_per_s": 10000.0,
        "orchd_tokens_per_s": 9800.0,
        "orchd_cost_pct": 2.0,
        "max_gpu_utilization": 97.0,
        "max_vram_used_bytes": 5e9,
    }
    (logs / "torch.json").write_text(json.dumps(torch))
    runs = [{"frontends": n, "token_events_per_s": 1000.0 * min(n, 2.5)} for n in (1, 2, 4, 8)]
    bench = {
        "headline": [],
        "errors": {},
        "results": {
            "scale_out": {"cores": 16, "runs": runs},
            "latency": {"orchd": {"median_ttft_ms": 1.3}, "direct": {"median_ttft_ms": 1.0}},
        },
    }
    (logs / "bench" / "bench-quick-1.json").write_text(json.dumps(bench))
    steps = {
        "tests": _step("tests", ["...", "3 passed in 40.00s"]),
        "torch": _step("torch", []),
        "bench": _step("bench", []),
    }
    figs, targets = gpu_check.figures(False, logs, steps)
    met = {t["name"]: t["met"] for t in targets}
    assert figs["gpu_tests"] == {"passed": 3}
    assert met["orchd_cost_pct (torch engine)"] is True
    assert met["NVML gauges moved under load (max gpu_utilization %, VRAM)"] is True
    assert met["scale-out, 4 frontends / 1"] is False  # 2.5 x
    assert met["TTFT p50 over direct (64 streams)"] is True  # +0.3 ms
    result = {
        "date": "now",
        "cpu": False,
        "orchd_rev": "abc",
        "host": {"cores": 16, "gpus": [{"name": "H200"}], "python": "3.12", "torch": "2.9"},
        "wheels": ["a.whl"],
        "elapsed_s": 400.0,
        "steps": [s.__dict__ for s in steps.values()],
        "figures": figs,
        "targets": targets,
        "ok": True,
    }
    text = gpu_check.summary(result)
    assert "16 cores, H200" in text
    assert "scale-out, 4 frontends / 1: 2.5; target >= 3 x [NOT met]" in text
    assert "scale-out token events/s: 1 fe 1000, 2 fe 2000, 4 fe 2500, 8 fe 2500" in text
    assert text.rstrip().endswith("result: PASS")
    # On the CPU rehearsal nothing is scored.
    _, rehearsal = gpu_check.figures(True, logs, steps)
    assert {t["met"] for t in rehearsal} == {None}


def test_wheels_unpack_into_an_importable_folder(tmp_path: Path) -> None:
    """The GPU host has no pip to spare and no network: a wheel is a zip of its import tree."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "gpucheckprobe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("gpucheckprobe/__init__.py", "VALUE = 42\n")
        z.writestr("gpucheckprobe-1.0.dist-info/METADATA", "Name: gpucheckprobe\n")
    site = tmp_path / "site"
    assert gpu_check.unpack_wheels(wheels, site) == ["gpucheckprobe-1.0-py3-none-any.whl"]
    out = subprocess.run(
        [sys.executable, "-c", "import gpucheckprobe; print(gpucheckprobe.VALUE)"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(site)},
    )
    assert out.stdout.strip() == "42"
    assert gpu_check.missing_modules(["json", "gpucheckprobe_absent"]) == ["gpucheckprobe_absent"]
