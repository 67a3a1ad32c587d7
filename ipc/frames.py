"""SSE frames, encoded once by the supervisor; the frontend only copies these bytes.

Event ids are the event's sequence number within its task: ``started`` is 0, each later event
adds one. A ``token``'s ``i`` is its 0-based index among the task's tokens.
"""

from __future__ import annotations

from typing import Any

import msgspec

_json = msgspec.json.Encoder()

KIND_DATA = 1
KIND_TERMINAL = 2


def frame(event: str, seq: int, data: dict[str, Any]) -> bytes:
    return b"event: %s\nid: %d\ndata: %s\n\n" % (event.encode(), seq, _json.encode(data))


def token_frame(seq: int, index: int, text_json: bytes) -> bytes:
    """``text_json`` is the token text already encoded as a JSON string (quotes included)."""
    return b'event: token\nid: %d\ndata: {"t":%s,"i":%d}\n\n' % (seq, text_json, index)


def json_string(text: str) -> bytes:
    return _json.encode(text)


def end_data(
    tokens_out: int, decode_ms: float, decode_time_ms: float, reason: str
) -> dict[str, Any]:
    """An `end` event's data less its ``artifact_id``; the times are int64 ms."""
    return {
        "tokens_out": tokens_out,
        "decode_ms": round(decode_ms),
        "decode_time_ms": round(decode_time_ms),
        "reason": reason,
    }


def end_frame(
    seq: int,
    tokens_out: int,
    decode_ms: float,
    decode_time_ms: float,
    reason: str,
    artifact_id: str | None = None,
) -> bytes:
    """``artifact_id`` (the transcript's) is omitted where none was stored."""
    data = end_data(tokens_out, decode_ms, decode_time_ms, reason)
    if artifact_id is not None:
        data["artifact_id"] = artifact_id
    return frame("end", seq, data)


def error_frame(seq: int, envelope: dict[str, Any]) -> bytes:
    keys = ("code", "message", "engine", "retriable", "retry_after_ms", "pool_id", "policy_label")
    body = {k: envelope[k] for k in keys if envelope.get(k) is not None}
    return frame("error", seq, body)


def metrics_frame(
    seq: int,
    queue_depth: int,
    on_time_probability: float,
    kv_warmth: bool,
    budgets: tuple[float | None, float | None, float | None],
) -> bytes:
    """``budgets``: (tokens, time ms, cost) left; an unlimited one (None) is omitted.
    Tokens and time are int64 in the contract, cost a number."""
    tokens, time_ms, cost = budgets
    data: dict[str, Any] = {
        "queue_depth": queue_depth,
        "on_time_probability": on_time_probability,
        "kv_warmth": kv_warmth,
    }
    if tokens is not None:
        data["tokens_budget_remaining"] = int(tokens)
    if time_ms is not None:
        data["time_budget_remaining_ms"] = int(time_ms)
    if cost is not None:
        data["cost_budget_remaining"] = round(cost, 6)
    return frame("metrics", seq, data)
