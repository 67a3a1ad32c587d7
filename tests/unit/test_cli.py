"""The ``orchd`` command's config, version and error paths (no daemon started), and the log
formats it sets up."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchd import __version__, log
from orchd.build_info import git_sha
from orchd.cli import describe, main
from orchd.config import load_sourced

REPO = Path(__file__).resolve().parents[2]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(autouse=True)
def _no_orchd_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in __import__("os").environ if v.startswith("ORCHD_")]:
        monkeypatch.delenv(var)


def test_version_names_the_release_and_the_commit(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out.strip()
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert re.fullmatch(rf"orchd {re.escape(__version__)} \(git {head}(\+dirty)?\)", out), out
    assert git_sha().startswith(head)


def test_config_prints_every_value_with_its_source(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[server]\nport = 9000\n[[replicas]]\nid = "a"\n[replicas.mock]\nttft_ms = 1\n')
    monkeypatch.setenv("ORCHD_QUEUE_CAPACITY", "5")
    code, out, _ = run(capsys, "config", "--config", str(path), "--frontends", "2")
    assert code == 0
    lines = out.splitlines()
    assert f"server.port = 9000  # file {path}" in lines
    assert "server.frontends = 2  # flag --frontends" in lines
    assert "limits.queue_capacity = 5  # env ORCHD_QUEUE_CAPACITY" in lines
    assert "limits.ring_bytes = 4194304  # default" in lines
    assert f"replicas[0].mock.ttft_ms = 1.0  # file {path}" in lines
    assert "replicas[0].mock.itl_ms = 2.0  # default" in lines
    assert 'replicas[0].engine = "mock"  # default' in lines
    assert not any(line.startswith("replicas[1]") for line in lines)
    # Every line is `path = <JSON value>  # source`.
    for line in lines:
        m = re.fullmatch(
            r"([\w.\[\]]+) = (.*)  # (default|file .+|env ORCHD_\w+|flag --[\w-]+)", line
        )
        assert m is not None, line
        json.loads(m.group(2))


def test_config_shows_keys_by_id_never_the_secret(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORCHD_API_KEYS", "top-secret-1,top-secret-2")
    code, out, _ = run(capsys, "config")
    assert code == 0
    assert "top-secret" not in out
    line = next(x for x in out.splitlines() if x.startswith("server.api_keys ="))
    assert re.fullmatch(
        r'server.api_keys = \["key id [0-9a-f]{12} \(admin\)","key id [0-9a-f]{12} \(admin\)"\]'
        r"  # env ORCHD_API_KEYS",
        line,
    ), line


@pytest.mark.parametrize(
    ("toml", "env", "message"),
    [
        ('[[replicas]]\nid = "a"\n[replicas.mock]\nttft_ms = "5"\n', {}, "expected float, got '5'"),
        ("", {"ORCHD_LOG_LEVL": "debug"}, "unknown environment variable ORCHD_LOG_LEVL"),
        ("", {"ORCHD_LOG_LEVEL": "loud"}, "server.log_level: unknown log_level 'loud'"),
        ('[server]\nlog_level = "trace"\n', {}, "unknown log_level 'trace'"),
        ('[server]\nlog_format = "xml"\n', {}, "unknown log_format 'xml'"),
        ("[server]\nbogus = 1\n", {}, "bogus"),
    ],
)
def test_config_refuses_what_it_cannot_use(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    toml: str,
    env: dict[str, str],
    message: str,
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(toml)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    code, out, err = run(capsys, "config", "--config", str(path))
    assert code == 2 and out == ""
    assert err.startswith("orchd: ") and message in err, err


def test_describe_names_the_nearest_source_above_a_value(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("[scheduling]\nkey_weights = {a = 2.0}\n")
    cfg, sources = load_sourced(str(path), env={})
    lines = describe(cfg, sources)
    assert f'scheduling.key_weights = {{"a":2.0}}  # file {path}' in lines


def test_the_module_runs_as_a_command() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "orchd.cli", "config"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert "server.port = 8080  # default" in r.stdout


# ---------------------------------------------------------------- log formats


class FakeStderr(io.TextIOWrapper):
    """A stderr that says whether it is a terminal; what is written lands in ``raw``."""

    def __init__(self, tty: bool) -> None:
        self.raw_bytes = io.BytesIO()
        super().__init__(self.raw_bytes, encoding="utf-8")
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def lines_written(monkeypatch: pytest.MonkeyPatch, tty: bool, fmt: str, **fields: Any) -> str:
    err = FakeStderr(tty)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(log, "_defer", {"on": False, "wake": None})
    log.setup("scheduler", "info", fmt)
    log.info("admitted", **fields)
    err.flush()
    return err.raw_bytes.getvalue().decode()


@pytest.mark.parametrize(
    ("tty", "fmt", "text"),
    [(True, "auto", True), (False, "auto", False), (False, "text", True), (True, "json", False)],
)
def test_text_on_a_terminal_json_otherwise(
    monkeypatch: pytest.MonkeyPatch, tty: bool, fmt: str, text: bool
) -> None:
    out = lines_written(monkeypatch, tty, fmt, task_id="t-1", queue_position=0, why="a b")
    if text:
        assert re.fullmatch(
            r"\d\d:\d\d:\d\d\.\d{3} INFO +scheduler  admitted  task_id=t-1 queue_position=0"
            r' why="a b"\n',
            out,
        ), out
    else:
        rec = json.loads(out)
        assert (rec["narration"], rec["task_id"], rec["component"]) == (
            "admitted",
            "t-1",
            "scheduler",
        )


def test_a_bound_task_s_lines_carry_its_correlation_id(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_cids", type(log._cids)())
    log.bind_task("k/t-9", "cid-9")
    rec = json.loads(lines_written(monkeypatch, False, "json", task_id="k/t-9"))
    assert rec["cid"] == "cid-9"
    assert "cid" not in json.loads(lines_written(monkeypatch, False, "json", task_id="k/t-8"))
    explicit = json.loads(lines_written(monkeypatch, False, "json", task_id="k/t-9", cid="own"))
    assert explicit["cid"] == "own"  # a line's own id wins


def test_bound_ids_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(log, "_cids", type(log._cids)())
    monkeypatch.setattr(log, "MAX_BOUND_TASKS", 3)
    for i in range(5):
        log.bind_task(f"t-{i}", f"c-{i}")
    assert list(log._cids) == ["t-2", "t-3", "t-4"]
