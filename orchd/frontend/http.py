"""HTTP helpers: the error envelope as a response, and request bodies read within a limit."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from orchd.core.errors import Code, OrchdError

_json = msgspec.json.Encoder()

# JSON nested deeper than this is refused before it is parsed (a parser recursing 1,000
# levels deep raises RecursionError; the contract's bodies nest 3 levels).
MAX_JSON_DEPTH = 64
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = bytes(c for c in range(256) if c not in b"[]{}")


def json_depth_ok(body: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether no array or object in ``body`` nests deeper than ``limit`` (strings skipped).
    Linear in the body; a body with fewer brackets than the limit is not scanned."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return True
    if b'"' in body:
        body = _STRING.sub(b"", body)
    depth = 0
    for c in body.translate(None, _NOT_BRACKET):
        if c in b"[{":
            depth += 1
            if depth > limit:
                return False
        else:
            depth -= 1
    return True


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return _json.encode(content)


def error_response(e: OrchdError, headers: dict[str, str] | None = None) -> Response:
    h = dict(headers or {})
    if e.retry_after_ms is not None and e.status in (429, 503):
        h["Retry-After"] = str(max(1, -(-e.retry_after_ms // 1000)))
        h["X-Backoff-Ms"] = str(e.retry_after_ms)
    return JSON(e.envelope(), status_code=e.status, headers=h)


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise _too_large(limit)
        except ValueError:
            raise OrchdError(Code.INVALID_PARAMS, "Content-Length is not a number") from None
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise _too_large(limit)
    except ClientDisconnect:
        # The client left, or the edge closed it (limits.body_timeout_ms): nobody to answer.
        raise OrchdError(Code.INVALID_PARAMS, "the request body did not arrive") from None
    if not json_depth_ok(bytes(body)):
        raise OrchdError(
            Code.INVALID_PARAMS, f"JSON nests deeper than {MAX_JSON_DEPTH} levels, the limit"
        )
    return bytes(body)


def _too_large(limit: int) -> OrchdError:
    return OrchdError(Code.PAYLOAD_TOO_LARGE, f"request body exceeds {limit} bytes")
