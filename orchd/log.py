"""Structured logs: one JSON object per line on stderr, with a short human ``narration``.

Never called per token; admission, placement, stream start/end, cancel and lifecycle only.
A busy process defers: lines are buffered and written together by :func:`flush`, which its
loop calls once per turn (the scheduler) or schedules on the first buffered line (asyncio
processes), so a burst of admissions costs one write, not one per line.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_state: dict[str, Any] = {"component": "orchd", "level": 20}
_enc = msgspec.json.Encoder()


_buf: list[bytes] = []
_defer: dict[str, Any] = {"on": False, "wake": None}


def setup(component: str, level: str = "info") -> None:
    _state["component"] = component
    _state["level"] = _LEVELS.get(level, 20)


def defer(wake: Callable[[], object] | None = None) -> None:
    """Buffer lines until :func:`flush`; ``wake`` is called when the buffer becomes non-empty
    (e.g. ``lambda: loop.call_soon(log.flush)``)."""
    _defer["on"] = True
    _defer["wake"] = wake
    atexit.register(flush)


def flush() -> None:
    if not _buf:
        return
    data = b"".join(_buf)
    _buf.clear()
    with contextlib.suppress(OSError, ValueError):  # a closed stderr must not stop us
        sys.stderr.buffer.write(data)
        sys.stderr.flush()


def _emit(level: str, narration: str, fields: dict[str, Any]) -> None:
    if _LEVELS[level] < int(_state["level"]):
        return
    rec = {"ts": round(time.time(), 3), "level": level, "component": _state["component"]}
    rec["narration"] = narration
    rec.update(fields)
    _buf.append(_enc.encode(rec) + b"\n")
    if not _defer["on"] or level in ("warning", "error"):
        flush()
    elif len(_buf) == 1 and _defer["wake"] is not None:
        _defer["wake"]()


def debug(narration: str, **fields: Any) -> None:
    _emit("debug", narration, fields)


def info(narration: str, **fields: Any) -> None:
    _emit("info", narration, fields)


def warning(narration: str, **fields: Any) -> None:
    _emit("warning", narration, fields)


def error(narration: str, **fields: Any) -> None:
    _emit("error", narration, fields)
