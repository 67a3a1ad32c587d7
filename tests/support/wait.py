"""Waiting on a condition with a deadline (never a bare sleep standing in for one)."""

from __future__ import annotations

import time
from collections.abc import Callable

POLL_S = 0.01


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> None:
    """Return as soon as ``cond()`` is true; TimeoutError naming ``what`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(POLL_S)  # the poll interval of the condition, not a wait for an event
