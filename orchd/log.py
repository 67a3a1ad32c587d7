"""Structured logs: one JSON object per line on stderr, with a short human ``narration``.

Never called per token; admission, placement, stream start/end, cancel and lifecycle only.
"""

from __future__ import annotations

import sys
import time
from typing import Any

import msgspec

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_state: dict[str, Any] = {"component": "orchd", "level": 20}
_enc = msgspec.json.Encoder()


def setup(component: str, level: str = "info") -> None:
    _state["component"] = component
    _state["level"] = _LEVELS.get(level, 20)


def _emit(level: str, narration: str, fields: dict[str, Any]) -> None:
    if _LEVELS[level] < int(_state["level"]):
        return
    rec = {"ts": round(time.time(), 3), "level": level, "component": _state["component"]}
    rec["narration"] = narration
    rec.update(fields)
    try:
        sys.stderr.buffer.write(_enc.encode(rec) + b"\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # a closed stderr must not take the process down


def debug(narration: str, **fields: Any) -> None:
    _emit("debug", narration, fields)


def info(narration: str, **fields: Any) -> None:
    _emit("info", narration, fields)


def warning(narration: str, **fields: Any) -> None:
    _emit("warning", narration, fields)


def error(narration: str, **fields: Any) -> None:
    _emit("error", narration, fields)
