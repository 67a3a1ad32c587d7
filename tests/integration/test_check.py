"""``orchd check`` and ``orchd serve --self-test``, run as an operator runs them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

BROKEN = """
[[replicas]]
id = "ok0"

[[replicas]]
id = "dead"
pool_id = "remote"
engine = "vllm"
model_ref = "hf:org/model"
[replicas.endpoint]
url = "http://127.0.0.1:9"   # discard port: nothing answers there
model = "m"
ready_timeout_s = 2
"""

MISSING_MODEL = """
[[replicas]]
id = "t0"
engine = "torch"
model_ref = "file:{root}/no-such-model"
[replicas.endpoint]
ready_timeout_s = 180   # torch's import alone may take a while on a loaded machine
[catalog]
model_roots = ["{root}"]
"""


def orchd(*args: str, timeout: float = 240.0) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHD_")}
    return subprocess.run(
        [sys.executable, "-m", "orchd.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_check_passes_on_the_default_config() -> None:
    r = orchd("check")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    for name in ("config", "start", "engine r0", "engine r1", "decode default", "cancel"):
        assert any(line.startswith(f"ok    {name}") for line in lines), (name, r.stdout)
    for name in ("metrics", "logs", "stop"):
        assert any(line.startswith(f"ok    {name}:") for line in lines), (name, r.stdout)
    assert lines[-1] == "orchd check: all 9 checks passed"


def test_check_fails_on_an_engine_at_a_dead_url(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text(BROKEN)
    r = orchd("check", "--config", str(cfg))
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert re.search(
        r"^FAIL  engine dead \(vllm via openai\): not ready: .*http://127\.0\.0\.1:9", out, re.M
    ), out
    assert "FAIL  decode remote: no ready replica" in out
    assert re.search(r"^ok    engine ok0 ", out, re.M)  # the healthy one still passes
    assert re.search(r"^orchd check: 2 of \d+ checks failed$", out, re.M), out


def test_check_fails_on_a_missing_model_file(tmp_path: Path) -> None:
    cfg = tmp_path / "missing.toml"
    cfg.write_text(MISSING_MODEL.format(root=tmp_path))
    r = orchd("check", "--config", str(cfg))
    assert r.returncode == 1, r.stdout + r.stderr
    assert re.search(
        r"^FAIL  engine t0 \(torch via torch\): not ready: .*no-such-model", r.stdout, re.M
    ), r.stdout


def test_check_fails_on_a_config_it_cannot_read(tmp_path: Path) -> None:
    cfg = tmp_path / "typed.toml"
    cfg.write_text('[[replicas]]\nid = "a"\n[replicas.mock]\nttft_ms = "5"\n')
    r = orchd("check", "--config", str(cfg))
    assert r.returncode == 2
    assert "replicas[0].mock.ttft_ms: expected float, got '5'" in r.stderr


def test_serve_self_test_refuses_to_serve_a_broken_config(tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text(BROKEN)
    r = orchd("serve", "--self-test", "--config", str(cfg), "--port", "0")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "orchd self-test: FAIL  engine dead" in r.stderr
    assert r.stderr.rstrip().endswith("orchd: self-test failed; not serving")
    assert '"narration":"ready"' not in r.stderr  # the orchd under test logs to the check only


def test_serve_self_test_passes_then_serves(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ORCHD_")}
    env["ORCHD_LOG_FORMAT"] = "json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchd.cli", "serve", "--self-test", "--port", "0"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # ends when the process does
            lines.append(line)
            if '"narration":"ready"' in line:
                break
        assert any("orchd self-test: orchd check: all 9 checks passed" in x for x in lines), lines
        ready = json.loads(lines[-1])
        assert ready["component"] == "launcher"
        assert httpx.get(ready["url"] + "/metrics", timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.communicate(timeout=60)
    assert proc.returncode == 0
