"""Pure-ASGI middleware of the frontend, one concern each, composed outermost first:
:class:`CorrelationId` (ids on every response), :class:`AccessLog` (one log line per request,
refusals included), :class:`ApiKeys` (every guarded path needs a key), :class:`FastRoutes` (the
hottest routes skip Starlette's router)."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import os
import re
import time
from collections.abc import Awaitable, Callable, Collection, Iterable
from typing import Any

from starlette.convertors import Convertor, StringConvertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ipc.protocol import TaskSpec
from orchd import log
from orchd.config import ApiKey
from orchd.core.errors import Code, OrchdError
from orchd.frontend.http import error_response
from orchd.keys import KeyEntry, key_entry

OPEN_PATHS = frozenset({"/metrics"})
# Probes and scrapes: their successful answers are logged at debug, not info (a load balancer
# asks every second); a failed one is logged like any request.
QUIET_PATHS = frozenset({"/metrics", "/healthz", "/readyz", "/version"})
_MAX_CID = 128

Endpoint = Callable[[Request], Awaitable[Any]]
ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]

# Also open: the probes and the operator page's static files (what the page shows comes from
# keyed routes; ``/`` only redirects to ``/ui``), and every ``<prefix><name>`` with a single
# path segment as name.
PROBE_PATHS = frozenset({"/healthz", "/readyz", "/version", "/ui", "/ui/", "/"})
OPEN_PREFIXES = ("/ui/",)


def _valid_cid(v: bytes) -> bool:
    return 0 < len(v) <= _MAX_CID and all(0x21 <= c <= 0x7E for c in v)


class CorrelationId:
    """Echoes a valid ``X-Correlation-Id`` (printable ASCII, at most 128 bytes) or makes one,
    into ``scope["state"]["correlation_id"]`` and onto every response's headers, whichever
    layer answers (a 401 from :class:`ApiKeys`, an SSE stream, a 500)."""

    def __init__(self, app: ASGIApp, frontend: int) -> None:
        self.app = app
        self.frontend_header = (b"x-orchd-frontend", str(frontend).encode())
        # Generated ids: 32 hex digits, a random per-process prefix + a counter (unique
        # without a urandom call per request).
        self.prefix = os.urandom(8).hex().encode()
        self.counter = itertools.count(int.from_bytes(os.urandom(4), "big"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cid = b""
        for name, value in scope["headers"]:
            if name == b"x-correlation-id":
                cid = value
        if not _valid_cid(cid):
            cid = b"%s%016x" % (self.prefix, next(self.counter))
        scope.setdefault("state", {})["correlation_id"] = cid.decode()
        added = [(b"x-correlation-id", cid), self.frontend_header]

        async def send_with_cid(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *added]
            await send(message)

        await self.app(scope, receive, send_with_cid)


class AccessLog:
    """One ``access`` log line per request, when its response is done (for a stream, when the
    stream ends): method, path (no query), status, duration_ms, cid, key_id (the key's
    non-secret id, never the key), task_id when the request names or creates one, frontend.
    401, 403, 404, 413, 429 and every other refusal are logged like the rest; a request whose
    app raised is logged as 500 before the error goes on."""

    def __init__(self, app: ASGIApp, frontend: int) -> None:
        self.app = app
        self.frontend = frontend

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.monotonic()
        status = 0

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        except BaseException:
            self.line(scope, status or 500, start)
            raise
        self.line(scope, status, start)

    def line(self, scope: Scope, status: int, start: float) -> None:
        state = scope.get("state", {})
        fields: dict[str, Any] = {
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "duration_ms": round((time.monotonic() - start) * 1000.0, 3),
            "cid": state.get("correlation_id", ""),
            "key_id": state.get("api_key_id", ""),
        }
        task_id = state.get("task_id") or scope.get("path_params", {}).get("task_id")
        if task_id:
            fields["task_id"] = task_id
        fields["frontend"] = self.frontend
        if status < 400 and scope["path"] in QUIET_PATHS:
            log.debug("access", **fields)
        else:
            log.info("access", **fields)


def tag_task(scope: Scope, spec: TaskSpec, shown_id: str) -> None:
    """This request submits ``spec``: its access line names the task (``shown_id``, as the
    client knows it), and the task carries the request's correlation id, so every process's
    log lines about it carry that id too."""
    state = scope.setdefault("state", {})
    state["task_id"] = shown_id
    spec.cid = state.get("correlation_id", "")
    log.bind_task(spec.task_id, spec.cid)


class ApiKeys:
    """Refuses a request to a guarded path without an accepted key (``X-API-Key``, else
    ``Authorization: Bearer``): 401 when none is given, 403 when it is not one of ours. The
    matching key's non-secret id goes to ``scope["state"]["api_key_id"]`` (what a request
    creates belongs to that key), its role to ``api_key_role`` and its stream cap to
    ``api_key_max_streams``. Only the keys' sha256 digests are held."""

    def __init__(
        self,
        app: ASGIApp,
        api_keys: Iterable[str | ApiKey | KeyEntry],
        open_paths: Collection[str] = OPEN_PATHS | PROBE_PATHS,
        open_prefixes: Collection[str] = OPEN_PREFIXES,
        respond: Callable[[str, OrchdError], Response] | None = None,
    ) -> None:
        self.app = app
        self.open_paths = frozenset(open_paths)
        self.open_prefixes = tuple(open_prefixes)
        # The refusal's shape for a path (the OpenAI routes answer in OpenAI's).
        self.respond = respond or (lambda path, err: error_response(err))
        self.keys = [k if isinstance(k, KeyEntry) else key_entry(k) for k in api_keys]

    def entry(self, given: bytes) -> KeyEntry | None:
        """The key ``given`` is, or None. Its digest is compared with every key's, each in
        constant time, so timing tells nothing about which one (if any) matched."""
        digest = hashlib.sha256(given).digest()
        found = None
        for k in self.keys:
            if hmac.compare_digest(digest, k.digest):
                found = k
        return found

    def key_id(self, given: bytes) -> str | None:
        e = self.entry(given)
        return None if e is None else e.id

    def is_open(self, path: str) -> bool:
        if path in self.open_paths:
            return True
        for prefix in self.open_prefixes:
            if path.startswith(prefix):
                name = path[len(prefix) :]
                return "/" not in name and name not in ("", ".", "..")
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        key: bytes | None = None
        bearer: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"x-api-key":
                key = value.strip()
            elif name == b"authorization":
                scheme, _, token = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    bearer = token.strip()
        if key is None:
            key = bearer
        entry = None if not key else self.entry(key)
        if entry is None:
            if key is None:
                err = OrchdError(Code.UNAUTHORIZED, "missing API key (X-API-Key or Bearer)")
            else:
                err = OrchdError(Code.FORBIDDEN, "API key not accepted")
            await self.respond(scope["path"], err)(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["api_key_id"] = entry.id
        state["api_key_role"] = entry.role
        state["api_key_max_streams"] = entry.max_streams
        await self.app(scope, receive, send)


class FastRoute(Route):
    """A route :class:`FastRoutes` serves ahead of Starlette's router, for the methods given
    (not the HEAD Starlette adds to a GET). Starlette's router serves it too, from this same
    definition, for whatever FastRoutes passes on."""

    def __init__(self, path: str, endpoint: Endpoint, *, methods: Collection[str]) -> None:
        super().__init__(path, endpoint, methods=methods)
        self.fast_methods = frozenset(m.upper() for m in methods)


class FastRoutes:
    """Dispatches the :class:`FastRoute` entries of a route list straight to their endpoints,
    skipping Starlette's routing and middleware stack (a linear scan of every route, a child
    scope per match): they carry every task. A path without parameters is one dict lookup;
    one with parameters is the route's own compiled regex (Starlette's, from the same
    template). Anything else goes to ``app``. An endpoint's exception becomes ``on_error``'s
    response, as Starlette's exception handler would have made it."""

    def __init__(self, app: ASGIApp, routes: Iterable[BaseRoute], on_error: ErrorHandler) -> None:
        self.app = app
        self.on_error = on_error
        self.exact: dict[str, dict[str, Endpoint]] = {}  # path -> method -> endpoint
        # (method, regex, convertors or None where every parameter is a plain str, endpoint)
        self.patterns: list[
            tuple[str, re.Pattern[str], dict[str, Convertor[Any]] | None, Endpoint]
        ] = []
        for r in routes:
            if not isinstance(r, FastRoute):
                continue
            for method in sorted(r.fast_methods):
                if not r.param_convertors:
                    self.exact.setdefault(r.path, {})[method] = r.endpoint
                    continue
                plain = all(type(c) is StringConvertor for c in r.param_convertors.values())
                convertors = None if plain else r.param_convertors
                self.patterns.append((method, r.path_regex, convertors, r.endpoint))

    def match(self, scope: Scope) -> Endpoint | None:
        """The fast endpoint for this request, its ``path_params`` set in ``scope``; or None."""
        path, method = scope["path"], scope["method"]
        by_method = self.exact.get(path)
        if by_method is not None and (endpoint := by_method.get(method)) is not None:
            return endpoint
        for m, regex, convertors, endpoint in self.patterns:
            if m == method and (found := regex.match(path)) is not None:
                params = found.groupdict()
                if convertors is not None:
                    params = {k: convertors[k].convert(v) for k, v in params.items()}
                scope["path_params"] = params
                return endpoint
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.match(scope) if scope["type"] == "http" else None
        if endpoint is None:
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        try:
            response = await endpoint(request)
        except Exception as e:
            response = await self.on_error(request, e)
        await response(scope, receive, send)
