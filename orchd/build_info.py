"""What build of orchd this is: its version and, from a git checkout, the commit."""

from __future__ import annotations

import functools
import os
import subprocess

from orchd import __version__

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.cache
def git_sha() -> str:
    """``ORCHD_GIT_SHA`` when set (an image build sets it), else the commit of the checkout
    orchd runs from (12 hex digits, ``+dirty`` with local changes), else "unknown" (an
    installed wheel, or no git). The one answer for ``--version``, ``/version`` and
    ``orchd_build_info``."""
    env = os.environ.get("ORCHD_GIT_SHA", "").strip()
    if env:
        return env
    try:
        sha = subprocess.run(
            ["git", "-C", _ROOT, "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", _ROOT, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def version_line() -> str:
    return f"orchd {__version__} (git {git_sha()})"
