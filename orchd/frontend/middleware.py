"""Pure-ASGI middleware: correlation ids on every response, API keys on every guarded path."""

from __future__ import annotations

import hmac
import itertools
import os
from collections.abc import Awaitable, Callable, Iterable

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchd.config import key_id
from orchd.core.errors import Code, OrchdError
from orchd.frontend.http import error_response

OPEN_PATHS = frozenset({"/metrics"})
FastHandler = Callable[[Request], Awaitable[ASGIApp]]
_MAX_CID = 128


def _valid_cid(v: bytes) -> bool:
    return 0 < len(v) <= _MAX_CID and all(0x21 <= c <= 0x7E for c in v)


class Gate:
    def __init__(
        self,
        app: ASGIApp,
        api_keys: Iterable[str],
        frontend: int,
        fast: dict[str, FastHandler] | None = None,
    ) -> None:
        self.app = app
        self.fast = dict(fast or {})
        self.frontend_header = (b"x-orchd-frontend", str(frontend).encode())
        # Generated correlation ids: 32 hex digits, a random per-process prefix + a counter
        # (unique without a urandom call per request).
        self.cid_prefix = os.urandom(8).hex().encode()
        self.cids = itertools.count(int.from_bytes(os.urandom(4), "big"))
        self.keys = [k.encode() for k in api_keys]
        self.key_ids = [key_id(k.decode()) for k in self.keys]

    def _key_id(self, given: bytes) -> str | None:
        """A non-secret id of the matching key, or None. Every key is compared, each in
        constant time, so timing tells nothing about which one matched."""
        found = None
        for k, kid in zip(self.keys, self.key_ids, strict=True):
            if hmac.compare_digest(given, k):
                found = kid
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cid = b""
        key: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-correlation-id":
                cid = value
            elif name == b"x-api-key":
                key = value.strip()
            elif name == b"authorization" and key is None:
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    key = token.strip()
        if not _valid_cid(cid):
            cid = b"%s%016x" % (self.cid_prefix, next(self.cids))
        scope.setdefault("state", {})["correlation_id"] = cid.decode()

        async def send_with_cid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    (b"x-correlation-id", cid),
                    self.frontend_header,
                ]
            await send(message)

        if scope["path"] not in OPEN_PATHS:
            err = None
            key_id = None if key is None else self._key_id(key)
            if key is None:
                err = OrchdError(Code.UNAUTHORIZED, "missing API key (X-API-Key or Bearer)")
            elif key_id is None:
                err = OrchdError(Code.FORBIDDEN, "API key not accepted")
            if err is not None:
                await error_response(err)(scope, receive, send_with_cid)
                return
            scope["state"]["api_key_id"] = key_id
        fast = self.fast_path(scope)
        if fast is not None:
            # The hottest routes skip Starlette's routing and middleware stack.
            response = await fast(Request(scope, receive))
            await response(scope, receive, send_with_cid)
            return
        await self.app(scope, receive, send_with_cid)

    def fast_path(self, scope: Scope) -> FastHandler | None:
        path, method = scope["path"], scope["method"]
        if method == "POST" and path == "/v1/tasks":
            return self.fast.get("submit")
        if method == "GET" and path.startswith("/v1/tasks/") and path.endswith("/stream"):
            task_id = path[10:-7]
            if task_id and "/" not in task_id:
                scope["path_params"] = {"task_id": task_id}
                return self.fast.get("stream")
        return None
