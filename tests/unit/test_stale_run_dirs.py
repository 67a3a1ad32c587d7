"""A launcher killed with -9 leaves its run directory: the next start removes it (issue 12)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchd.config import ConfigError
from orchd.launcher import PID_FILE, reclaim_run_dir, reclaim_stale_run_dirs
from tests.support.wait import wait_for


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def orchd_pid() -> Iterator[int]:
    """A live process whose command line names orchd (as a launcher's does)."""
    yield from _reader("orchd.cli", "serve")


@pytest.fixture
def other_pid() -> Iterator[int]:
    """A live process of another program (a launcher's pid reused)."""
    yield from _reader()


def _reader(*args: str) -> Iterator[int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()", *args], stdin=subprocess.PIPE
    )
    want = "\0".join(args).encode()
    wait_for(lambda: want in Path(f"/proc/{proc.pid}/cmdline").read_bytes(), 10, "its exec")
    yield proc.pid
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait()


def run_dir(parent: Path, name: str, pid: int | None) -> Path:
    d = parent / name
    d.mkdir()
    (d / "scheduler.sock").write_text("")
    if pid is not None:
        (d / PID_FILE).write_text(f"{pid}\n")
    return d


def test_only_run_dirs_of_launchers_that_are_gone_are_removed(
    tmp_path: Path, orchd_pid: int, other_pid: int
) -> None:
    stale = run_dir(tmp_path, "orchd-stale", dead_pid())
    reused = run_dir(tmp_path, "orchd-reused", other_pid)  # a live pid, not an orchd
    live = run_dir(tmp_path, "orchd-live", orchd_pid)
    unknown = run_dir(tmp_path, "orchd-nopid", None)
    other = run_dir(tmp_path, "other-stale", dead_pid())
    assert sorted(reclaim_stale_run_dirs(str(tmp_path))) == [str(reused), str(stale)]
    assert not stale.exists() and not reused.exists()
    assert live.exists() and unknown.exists() and other.exists()


def test_a_configured_run_dir_left_by_a_dead_launcher_is_cleared_but_state_kept(
    tmp_path: Path,
) -> None:
    d = run_dir(tmp_path, "state", dead_pid())
    (d / "config.json").write_text("{}")
    (d / "journal.log").write_text("kept")
    reclaim_run_dir(str(d))
    assert sorted(os.listdir(d)) == ["journal.log"]


def test_a_configured_run_dir_in_use_is_refused(tmp_path: Path, orchd_pid: int) -> None:
    d = run_dir(tmp_path, "busy", orchd_pid)
    with pytest.raises(ConfigError, match="in use by the orchd launcher"):
        reclaim_run_dir(str(d))
