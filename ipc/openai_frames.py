"""OpenAI-shaped bytes, encoded once: the chunks of a streamed chat or completion, the
finished response bodies, and the error shape. The supervisor builds a task's frames with
these (engine_procs/codecs.py); the frontend uses the error and end frames for the streams
whose end it writes itself. Shapes follow OpenAI's API reference and vLLM's server (usage
chunk with ``choices: []``; ``continuous_usage_stats`` puts usage on every chunk).

Every streamed frame keeps an ``id:`` line (the event's sequence number), as orchd's native
frames do, so that a client can resume with ``Last-Event-ID``.
"""

from __future__ import annotations

import base64
import struct
from typing import Any

import msgspec

_json = msgspec.json.Encoder()

DONE = b"data: [DONE]\n\n"

FINISH_REASONS = {"stop": "stop", "length": "length", "budget": "length", "canceled": "stop"}


def finish_reason(reason: str) -> str:
    return FINISH_REASONS.get(reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def data_frame(seq: int, body: bytes) -> bytes:
    return b"id: %d\ndata: %s\n\n" % (seq, body)


def error_frame(seq: int | None, error_body: dict[str, Any]) -> bytes:
    """An error after the stream started: one ``data: {"error": ...}`` frame (no [DONE]);
    ``seq`` None: no ``id:`` (the connection failed, not the task: the client resumes)."""
    if seq is None:
        return b"data: %s\n\n" % _json.encode(error_body)
    return data_frame(seq, _json.encode(error_body))


def encode(obj: Any) -> bytes:
    return _json.encode(obj)


class ChunkShape:
    """The fixed parts of one task's chunks, encoded once: a token's chunk is then
    ``head + text_json + tail`` with no JSON encoding per token."""

    __slots__ = ("kind", "base", "head", "tail")

    def __init__(self, kind: str, task_id: str, model: str, created: int) -> None:
        self.kind = kind  # "chat" | "completions"
        obj = "chat.completion.chunk" if kind == "chat" else "text_completion"
        self.base = b'{"id":%s,"object":"%s","created":%d,"model":%s' % (
            _json.encode(task_id),
            obj.encode(),
            created,
            _json.encode(model),
        )
        # A token's chunk carries only what clients read (logprobs, absent, means none).
        if kind == "chat":
            self.head = self.base + b',"choices":[{"index":0,"delta":{"content":'
            self.tail = b'},"finish_reason":null}]'
        else:
            self.head = self.base + b',"choices":[{"index":0,"text":'
            self.tail = b',"finish_reason":null}]'

    def token(self, text_json: bytes, usage_json: bytes = b"") -> bytes:
        if usage_json:
            return b'%s%s%s,"usage":%s}' % (self.head, text_json, self.tail, usage_json)
        return b"%s%s%s}" % (self.head, text_json, self.tail)

    def token_frame(self, seq: int, text_json: bytes) -> bytes:
        """A token's whole SSE frame in one formatting step (the hot path)."""
        return b"id: %d\ndata: %s%s%s}\n\n" % (seq, self.head, text_json, self.tail)

    def role(self, usage_json: bytes = b"") -> bytes:
        """A chat stream's first chunk: the assistant's role, no content yet."""
        body = self.base + (
            b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},'
            b'"logprobs":null,"finish_reason":null}]'
        )
        return body + (b',"usage":%s}' % usage_json if usage_json else b"}")

    def final(self, reason: str, usage_json: bytes = b"") -> bytes:
        delta = b'"delta":{}' if self.kind == "chat" else b'"text":""'
        body = b'%s,"choices":[{"index":0,%s,"logprobs":null,"finish_reason":"%s"}]' % (
            self.base,
            delta,
            finish_reason(reason).encode(),
        )
        return body + (b',"usage":%s}' % usage_json if usage_json else b"}")

    def usage_only(self, usage_json: bytes) -> bytes:
        return b'%s,"choices":[],"usage":%s}' % (self.base, usage_json)


def completion_body(
    kind: str,
    task_id: str,
    model: str,
    created: int,
    text_json: bytes,
    reason: str,
    usage_obj: dict[str, int],
) -> bytes:
    """The whole response of a request that did not stream."""
    if kind == "chat":
        choice = b'{"index":0,"message":{"role":"assistant","content":%s},' % text_json
        obj = b"chat.completion"
    else:
        choice = b'{"index":0,"text":%s,' % text_json
        obj = b"text_completion"
    return (
        b'{"id":%s,"object":"%s","created":%d,"model":%s,"choices":[%s'
        b'"logprobs":null,"finish_reason":"%s"}],"usage":%s}'
        % (
            _json.encode(task_id),
            obj,
            created,
            _json.encode(model),
            choice,
            finish_reason(reason).encode(),
            _json.encode(usage_obj),
        )
    )


def _base64_f32(vector: list[float]) -> str:
    """OpenAI's ``encoding_format: base64``: the vector as little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def embeddings_body(
    model: str, vectors: list[list[float]], prompt_tokens: int, encoding: str = "float"
) -> bytes:
    pack = _base64_f32 if encoding == "base64" else list
    return _json.encode(
        {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": pack(v)}
                for i, v in enumerate(vectors)
            ],
            "model": model,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
        }
    )
