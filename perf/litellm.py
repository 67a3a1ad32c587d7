"""The LiteLLM baseline: a LiteLLM proxy (``litellm[proxy]``, one worker) in front of the
same mock engines, the gateway users would otherwise put before their engines.

LiteLLM lives in its own venv (``perf/.venv-litellm``, git-ignored) so that its many pinned
dependencies never touch orchd's: created on first use with ``python -m venv`` and pip from
PyPI, at the pinned version below. Its upstream is :mod:`perf.oai_upstream` (an OpenAI
server over the mock engine processes), since LiteLLM speaks only to OpenAI-style endpoints.

    python -m perf.litellm --setup     # create the venv now (a few minutes, ~550 MB)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any

import psutil

from perf.procs import free_port, wait_port

# 1.81.13: a release from before the two known compromised uploads (1.82.7/1.82.8, and
# 1.107.0), both since pulled from PyPI.
VERSION = "1.81.13"
HERE = os.path.dirname(os.path.abspath(__file__))
VENV = os.path.join(HERE, ".venv-litellm")
MASTER_KEY = "sk-orchd-bench"


def _bin(name: str) -> str:
    return os.path.join(VENV, "bin", name)


def ensure_venv(say: Any = print) -> str:
    """The ``litellm`` executable, installing the pinned version first if it is missing."""
    stamp = os.path.join(VENV, f".installed-{VERSION}")
    if os.path.exists(stamp):
        return _bin("litellm")
    say(f"  creating {VENV} with litellm[proxy]=={VERSION} (first use, a few minutes)")
    base = getattr(sys, "_base_executable", sys.executable)
    if not os.path.exists(_bin("python")):
        subprocess.run([base, "-m", "venv", VENV], check=True)
    pip = [_bin("python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    r = subprocess.run(
        [*pip, f"litellm[proxy]=={VERSION}"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    if r.returncode:
        tail = r.stderr.decode(errors="replace").strip().splitlines()[-5:]
        raise RuntimeError(f"pip could not install litellm[proxy]=={VERSION}: {tail}")
    open(stamp, "w").close()
    return _bin("litellm")


def config_yaml(model: str, upstream_url: str) -> str:
    """One model routed to the upstream. JSON is valid YAML, so no YAML writer is needed."""
    cfg = {
        "model_list": [
            {
                "model_name": model,
                "litellm_params": {
                    "model": f"openai/{model}",
                    "api_base": upstream_url,
                    "api_key": "none",
                },
            }
        ],
        "litellm_settings": {"drop_params": True, "set_verbose": False},
        "general_settings": {"master_key": MASTER_KEY},
    }
    return json.dumps(cfg, indent=1)


class LiteLLM:
    """``litellm --config ... --num_workers 1`` as an operator would start it."""

    def __init__(self, model: str, upstream_url: str, say: Any = print) -> None:
        exe = ensure_venv(say)
        fd, self.config_path = tempfile.mkstemp(prefix="litellm-", suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(config_yaml(model, upstream_url))
        fd, self.log_path = tempfile.mkstemp(prefix="litellm-bench-", suffix=".log")
        self.port = free_port()
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        env.update(
            LITELLM_LOCAL_MODEL_COST_MAP="True",  # no download of the price list at start
            LITELLM_LOG="ERROR",
            LITELLM_TELEMETRY="False",
            DISABLE_SCHEMA_UPDATE="True",
            NO_DOCS="True",
        )
        with os.fdopen(fd, "wb") as log_file:
            self.proc = subprocess.Popen(
                [exe, "--config", self.config_path, "--host", "127.0.0.1",
                 "--port", str(self.port), "--num_workers", "1"],
                stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            )  # fmt: skip
        try:
            wait_port(self.port, timeout=180.0)
        except TimeoutError:
            words = "".join(self.log)
            self.stop()
            raise RuntimeError(f"LiteLLM did not start; its last words:\n{words}") from None

    @property
    def log(self) -> list[str]:
        with contextlib.suppress(OSError), open(self.log_path, "rb") as f:
            return [ln.decode(errors="replace") for ln in deque(f, maxlen=30)]
        return []

    def pids(self) -> dict[int, str]:
        """The proxy's processes (the CLI may run uvicorn in a child)."""
        try:
            parent = psutil.Process(self.proc.pid)
            kids = parent.children(recursive=True)
        except psutil.Error:
            return {}
        out = {parent.pid: "litellm"}
        out.update({k.pid: f"litellm{i + 1}" for i, k in enumerate(kids)})
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        for path in (self.config_path, self.log_path):
            with contextlib.suppress(OSError):
                os.unlink(path)


class Upstream:
    """:mod:`perf.oai_upstream` with ``engines`` mock engines of config ``mock``."""

    def __init__(self, engines: int, mock: dict[str, Any]) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "perf.oai_upstream", "--port", str(self.port),
             "--engines", str(engines), "--mock", json.dumps(mock)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_port(self.port, timeout=60.0)
        time.sleep(0.2)  # the engines are ready before the port opens; uvicorn's loop next

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def pids(self) -> dict[int, str]:
        parent = psutil.Process(self.proc.pid)
        out = {parent.pid: "upstream"}
        for i, k in enumerate(parent.children(recursive=True)):
            out[k.pid] = f"engine{i}"
        return out

    def stop(self) -> None:
        kids = []
        with contextlib.suppress(psutil.Error):
            kids = psutil.Process(self.proc.pid).children(recursive=True)
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        for k in kids:  # its engines, should it have died before closing them
            with contextlib.suppress(psutil.Error):
                k.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--setup", action="store_true", help="create the venv and exit")
    a = ap.parse_args()
    if a.setup:
        print(ensure_venv())


if __name__ == "__main__":
    main()
