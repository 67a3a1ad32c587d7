"""HTTP helpers: the error envelope as a response, and request bodies read within a limit."""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response

from orchd.core.errors import Code, OrchdError

_json = msgspec.json.Encoder()


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
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise _too_large(limit)
    return bytes(body)


def _too_large(limit: int) -> OrchdError:
    return OrchdError(Code.PAYLOAD_TOO_LARGE, f"request body exceeds {limit} bytes")
