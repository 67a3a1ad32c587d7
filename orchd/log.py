"""Structured logs: one record per line on stderr, with a short human ``narration``.

JSON lines, or when stderr is a terminal (``server.log_format = "auto"``, the default) a
human-readable line (``12:00:01.234 INFO  scheduler  admitted  task_id=t-0 cid=ab12...``).

Never called per token; admission, placement, stream start/end, cancel, lifecycle and one
access line per HTTP request only. A busy process defers: lines are buffered and written
together by :func:`flush`, which its loop calls once per turn (the scheduler) or schedules on
the first buffered line (asyncio processes), so a burst of admissions costs one write, not one
per line.

Correlation ids: a process that learns a task's correlation id (the ``cid`` of its
``TaskSpec``) calls :func:`bind_task`; from then on every line of that process with that
``task_id`` carries ``cid`` too, so one request's lines can be found in every process.
"""

from __future__ import annotations

import atexit
import contextlib
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
FORMATS = ("auto", "json", "text")
MAX_BOUND_TASKS = 65_536  # task ids whose correlation id a process remembers (oldest dropped)
_state: dict[str, Any] = {"component": "orchd", "level": 20, "text": False}
_enc = msgspec.json.Encoder()


_buf: list[bytes] = []
_defer: dict[str, Any] = {"on": False, "wake": None}
_cids: OrderedDict[str, str] = OrderedDict()  # task id -> correlation id


def setup(component: str, level: str = "info", fmt: str = "auto") -> None:
    """``fmt``: "json", "text", or "auto" (text when stderr is a terminal)."""
    _state["component"] = component
    _state["level"] = _LEVELS.get(level, 20)
    if fmt == "auto":
        try:
            _state["text"] = sys.stderr.isatty()
        except (AttributeError, ValueError):
            _state["text"] = False
    else:
        _state["text"] = fmt == "text"


def bind_task(task_id: str, cid: str) -> None:
    """Lines about ``task_id`` carry ``cid`` from now on (bounded: the oldest are forgotten)."""
    if not cid:
        return
    _cids[task_id] = cid
    _cids.move_to_end(task_id)
    if len(_cids) > MAX_BOUND_TASKS:
        _cids.popitem(last=False)


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


def _text(rec: dict[str, Any]) -> bytes:
    ts = rec.pop("ts")
    clock = time.strftime("%H:%M:%S", time.localtime(ts)) + f".{int(ts * 1000) % 1000:03d}"
    head = f"{clock} {rec.pop('level').upper():<7} {rec.pop('component')}  {rec.pop('narration')}"
    fields = []
    for k, v in rec.items():
        s = v if isinstance(v, str) and v and " " not in v else _enc.encode(v).decode()
        fields.append(f"{k}={s}")
    return (head + "  " + " ".join(fields) if fields else head).encode()


def _emit(level: str, narration: str, fields: dict[str, Any]) -> None:
    if _LEVELS[level] < int(_state["level"]):
        return
    rec = {"ts": round(time.time(), 3), "level": level, "component": _state["component"]}
    rec["narration"] = narration
    rec.update(fields)
    if "cid" not in rec and _cids:
        tid = rec.get("task_id")
        if isinstance(tid, str) and (cid := _cids.get(tid)) is not None:
            rec["cid"] = cid
    _buf.append((_text(rec) if _state["text"] else _enc.encode(rec)) + b"\n")
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
