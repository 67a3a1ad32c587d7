"""DESIGN section 4: orchd/core is sans-IO; importing it pulls in no network or event loop."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FORBIDDEN = ("zmq", "asyncio", "starlette", "uvicorn", "socket")

PROBE = r"""
import importlib, json, pkgutil, sys
import orchd.core
names = sorted(m.name for m in pkgutil.walk_packages(orchd.core.__path__, "orchd.core."))
for name in names:
    importlib.import_module(name)
forbidden = sys.argv[1].split(",")
print(json.dumps({"modules": names, "loaded": [m for m in forbidden if m in sys.modules]}))
"""


def test_core_imports_no_io_modules() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(FORBIDDEN)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    # The probe really imported the core, scheduler included.
    for expected in (
        "orchd.core.scheduler",
        "orchd.core.queue",
        "orchd.core.placement",
        "orchd.core.eta",
        "orchd.core.errors",
    ):
        assert expected in result["modules"]
    assert result["loaded"] == [], f"orchd/core pulled in {result['loaded']}"


def test_core_sources_do_not_read_the_clock() -> None:
    """No time.time() (or any clock) in the core: time is passed in."""
    for path in sorted((REPO / "orchd" / "core").glob("*.py")):
        text = path.read_text()
        assert "import time" not in text, path
        assert "from time" not in text, path
        assert "import random" not in text, path


SUPERVISOR_CORE = ("supervisor_core", "supervisor_engines", "supervisor_effects")

SUPERVISOR_PROBE = r"""
import importlib, json, sys
for name in sys.argv[2].split(","):
    importlib.import_module("engine_procs." + name)
forbidden = sys.argv[1].split(",")
print(json.dumps([m for m in forbidden if m in sys.modules]))
"""


def test_the_supervisor_core_is_sans_io_too() -> None:
    """The supervisor's rules import no socket or loop, and read no clock or randomness."""
    proc = subprocess.run(
        [sys.executable, "-c", SUPERVISOR_PROBE, ",".join(FORBIDDEN), ",".join(SUPERVISOR_CORE)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []
    for name in SUPERVISOR_CORE:
        text = (REPO / "engine_procs" / f"{name}.py").read_text()
        for banned in ("import time", "from time", "import random", "import os", "urandom"):
            assert banned not in text, (name, banned)
