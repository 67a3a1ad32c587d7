"""The frontend's middleware, each driven directly as an ASGI app around a tiny inner app (no
process, no socket): correlation ids on every response, API keys on every guarded path, and
the fast routes taken for exactly the routes marked fast."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchd.config import ApiKey
from orchd.frontend.middleware import ApiKeys, CorrelationId, FastRoute, FastRoutes
from orchd.keys import key_id

GENERATED = re.compile(r"[0-9a-f]{32}")


@dataclass
class Result:
    scope: Scope
    messages: list[Message] = field(default_factory=list)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0].get("headers", []))

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    @property
    def json(self) -> Any:
        return json.loads(self.body)


def call(
    app: ASGIApp, method: str = "GET", path: str = "/x", headers: dict[str, str] | None = None
) -> Result:
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()],
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 40000),
    }
    result = Result(scope)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        result.messages.append(message)

    asyncio.run(app(scope, receive, send))  # type: ignore[arg-type]
    return result


class Inner:
    """The app behind the middleware under test: answers 200 ``inner`` and keeps the scopes
    it saw."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scopes.append(scope)
        if scope["type"] == "http":
            await PlainTextResponse("inner")(scope, receive, send)


async def sse(scope: Scope, receive: Receive, send: Send) -> None:
    """A stream: its headers, then frames in several body messages."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream")],
        }
    )
    for frame in (b"event: started\n\n", b"event: end\n\n"):
        await send({"type": "http.response.body", "body": frame, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


# ---------------------------------------------------------------- CorrelationId


def test_a_valid_correlation_id_is_echoed_and_kept_in_state() -> None:
    inner = Inner()
    r = call(CorrelationId(inner, 3), headers={"X-Correlation-Id": "cid-1"})
    assert r.status == 200 and r.body == b"inner"
    assert r.headers[b"x-correlation-id"] == b"cid-1"
    assert r.headers[b"x-orchd-frontend"] == b"3"
    assert inner.scopes[0]["state"]["correlation_id"] == "cid-1"


def test_a_missing_correlation_id_is_generated_unique_per_request() -> None:
    app = CorrelationId(Inner(), 0)
    cids = {call(app).headers[b"x-correlation-id"] for _ in range(3)}
    assert len(cids) == 3
    assert all(GENERATED.fullmatch(c.decode()) for c in cids)


@pytest.mark.parametrize("bad", ["", "has space", "x" * 129, "tab\there", "é"])
def test_an_invalid_correlation_id_is_replaced(bad: str) -> None:
    inner = Inner()
    r = call(CorrelationId(inner, 0), headers={"X-Correlation-Id": bad})
    cid = r.headers[b"x-correlation-id"].decode()
    assert GENERATED.fullmatch(cid)
    assert inner.scopes[0]["state"]["correlation_id"] == cid


def test_the_longest_valid_correlation_id_is_kept() -> None:
    r = call(CorrelationId(Inner(), 0), headers={"X-Correlation-Id": "~" * 128})
    assert r.headers[b"x-correlation-id"] == b"~" * 128


def test_correlation_id_on_error_responses_and_streams() -> None:
    app = CorrelationId(ApiKeys(Inner(), ["k1"]), 1)
    for headers, status in (({}, 401), ({"X-API-Key": "nope"}, 403)):
        r = call(app, headers={**headers, "X-Correlation-Id": f"cid-{status}"})
        assert r.status == status
        assert r.headers[b"x-correlation-id"] == f"cid-{status}".encode()
        assert r.headers[b"x-orchd-frontend"] == b"1"
    r = call(CorrelationId(sse, 1), headers={"X-Correlation-Id": "cid-sse"})
    assert r.headers[b"x-correlation-id"] == b"cid-sse"
    assert r.headers[b"content-type"] == b"text/event-stream"
    assert r.body == b"event: started\n\nevent: end\n\n"
    assert all("headers" not in m for m in r.messages[1:])  # only the start is touched


def test_lifespan_passes_through_correlation_id_and_keys() -> None:
    inner = Inner()
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        raise AssertionError("the inner app sends nothing")

    asyncio.run(CorrelationId(ApiKeys(inner, ["k1"]), 0)(scope, receive, send))
    assert inner.scopes == [scope] and "state" not in scope


# ---------------------------------------------------------------- ApiKeys


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": "k2"},
        {"X-API-Key": " k2 "},
        {"Authorization": "Bearer k2"},
        {"Authorization": "bearer k2"},
    ],
)
def test_an_accepted_key_passes_with_its_id(headers: dict[str, str]) -> None:
    inner = Inner()
    r = call(ApiKeys(inner, ["k1", "k2"]), headers=headers)
    assert r.status == 200 and r.body == b"inner"
    assert inner.scopes[0]["state"]["api_key_id"] == key_id("k2")


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Basic azI6"}])
def test_no_key_is_401_with_the_envelope(headers: dict[str, str]) -> None:
    inner = Inner()
    r = call(ApiKeys(inner, ["k1"]), headers=headers)
    assert r.status == 401
    assert r.headers[b"content-type"] == b"application/json"
    assert r.json["code"] == "UNAUTHORIZED" and r.json["retriable"] is False
    assert inner.scopes == []


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": "k3"},
        {"Authorization": "Bearer k1x"},
        {"X-API-Key": "nope", "Authorization": "Bearer k1"},  # X-API-Key is the one looked at
    ],
)
def test_a_wrong_key_is_403_with_the_envelope(headers: dict[str, str]) -> None:
    inner = Inner()
    r = call(ApiKeys(inner, ["k1"]), headers=headers)
    assert r.status == 403 and r.json["code"] == "FORBIDDEN"
    assert {"code", "message", "retriable"} <= r.json.keys()
    assert inner.scopes == []


def test_open_paths_need_no_key() -> None:
    inner = Inner()
    assert call(ApiKeys(inner, ["k1"]), path="/metrics").status == 200
    assert "api_key_id" not in inner.scopes[0].get("state", {})
    assert call(ApiKeys(Inner(), ["k1"]), path="/metrics/x").status == 401
    assert call(ApiKeys(Inner(), ["k1"], open_paths={"/healthz"}), path="/healthz").status == 200


def test_every_key_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    keys = ApiKeys(Inner(), ["k1", "k2", "k3"])
    assert call(keys, headers={"X-API-Key": "k1"}).status == 200  # matches the first
    d = {k: hashlib.sha256(k).digest() for k in (b"k1", b"k2", b"k3")}
    assert compared == [(d[b"k1"], d[b"k1"]), (d[b"k1"], d[b"k2"]), (d[b"k1"], d[b"k3"])]


def test_a_key_given_by_its_sha256_is_accepted_with_the_same_id() -> None:
    inner = Inner()
    hashed = "sha256:" + hashlib.sha256(b"secret").hexdigest()
    keys = ApiKeys(inner, [ApiKey(hashed, "client")])
    assert call(keys, headers={"X-API-Key": "secret"}).status == 200
    assert inner.scopes[0]["state"]["api_key_id"] == key_id("secret") == key_id(hashed)
    # The hash itself is not a key.
    assert call(keys, headers={"X-API-Key": hashed}).status == 403


def test_the_key_role_and_stream_cap_go_to_state() -> None:
    inner = Inner()
    keys = ApiKeys(inner, ["plain", ApiKey("c", "client", max_streams=3)])
    call(keys, headers={"X-API-Key": "plain"})
    call(keys, headers={"X-API-Key": "c"})
    states = [s["state"] for s in inner.scopes]
    assert [(s["api_key_role"], s["api_key_max_streams"]) for s in states] == [
        ("admin", 0),  # a plain string key is an admin key
        ("client", 3),
    ]


@pytest.mark.parametrize("given", ["", " ", "Bearer "])
def test_an_empty_key_is_never_accepted(given: str) -> None:
    header = {"Authorization": given} if given.startswith("Bearer") else {"X-API-Key": given}
    # Even if an empty key slipped into the list, an empty key given never matches.
    r = call(ApiKeys(Inner(), ["k1", ""]), headers=header)
    assert r.status in (401, 403)


# ---------------------------------------------------------------- FastRoutes


Handler = Callable[[Request], Coroutine[Any, Any, Response]]


class Handlers:
    """Endpoints that answer with their own name, and the requests each saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, name: str) -> Handler:
        async def handle(request: Request) -> Response:
            self.seen.append((name, dict(request.path_params)))
            if name == "boom":
                raise RuntimeError("boom")
            return PlainTextResponse(name)

        return handle


def fast_app(h: Handlers, inner: ASGIApp | None = None) -> tuple[FastRoutes, Inner]:
    routes = [
        FastRoute("/v1/tasks", h("submit"), methods=["POST"]),
        FastRoute("/v1/tasks/{task_id}/stream", h("stream"), methods=["GET"]),
        Route("/v1/tasks/{task_id}/cancel", h("cancel"), methods=["POST"]),
        FastRoute("/v1/boom", h("boom"), methods=["GET"]),
    ]
    fallback = Inner()

    async def on_error(request: Request, exc: Exception) -> Response:
        return PlainTextResponse(f"handled {exc}", status_code=500)

    return FastRoutes(inner or fallback, routes, on_error), fallback


def test_the_fast_routes_go_straight_to_their_handlers() -> None:
    h = Handlers()
    app, inner = fast_app(h)
    r = call(app, "POST", "/v1/tasks")
    assert r.status == 200 and r.body == b"submit"
    r = call(app, "GET", "/v1/tasks/t-0/stream")
    assert r.body == b"stream" and r.scope["path_params"] == {"task_id": "t-0"}
    assert h.seen == [("submit", {}), ("stream", {"task_id": "t-0"})]
    assert inner.scopes == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/tasks"),  # a fast path, another method
        ("POST", "/v1/tasks/a/stream"),
        ("HEAD", "/v1/tasks/a/stream"),  # Starlette's own for a GET route, not fast
        ("GET", "/v1/tasks/a/b/stream"),
        ("GET", "/v1/tasks//stream"),
        ("GET", "/v1/tasks/a/stream/"),
        ("GET", "/v1/tasks/a/streams"),
        ("POST", "/v1/tasks/"),
        ("POST", "/v1/tasks/a/cancel"),  # a route, not marked fast
        ("GET", "/metrics"),
    ],
)
def test_everything_else_passes_through(method: str, path: str) -> None:
    h = Handlers()
    app, inner = fast_app(h)
    r = call(app, method, path)
    assert r.body == b"inner" and h.seen == []
    assert len(inner.scopes) == 1 and "path_params" not in inner.scopes[0]


def test_a_fast_handler_error_becomes_on_errors_response() -> None:
    app, _ = fast_app(Handlers())
    r = call(app, "GET", "/v1/boom")
    assert r.status == 500 and r.body == b"handled boom"


def test_starlette_serves_the_same_route_list() -> None:
    """The list FastRoutes reads is Starlette's route table too: whatever FastRoutes passes
    on (a route not marked fast, a HEAD) is routed by Starlette from the same definitions."""
    h = Handlers()
    routes = [
        FastRoute("/v1/tasks/{task_id}/stream", h("stream"), methods=["GET"]),
        Route("/v1/tasks/{task_id}/cancel", h("cancel"), methods=["POST"]),
    ]

    async def on_error(request: Request, exc: Exception) -> Response:
        raise AssertionError("no error expected")

    app = FastRoutes(Starlette(routes=routes), routes, on_error)
    assert call(app, "POST", "/v1/tasks/t-1/cancel").body == b"cancel"
    assert call(app, "HEAD", "/v1/tasks/t-2/stream").status == 200
    assert call(app, "GET", "/v1/tasks/t-3/stream").body == b"stream"
    assert call(app, "GET", "/v1/nothing").status == 404
    assert h.seen == [
        ("cancel", {"task_id": "t-1"}),
        ("stream", {"task_id": "t-2"}),
        ("stream", {"task_id": "t-3"}),
    ]


def test_path_parameters_use_the_templates_convertors() -> None:
    h = Handlers()
    routes = [FastRoute("/v1/n/{n:int}", h("n"), methods=["GET"])]

    async def on_error(request: Request, exc: Exception) -> Response:
        raise AssertionError("no error expected")

    app = FastRoutes(Inner(), routes, on_error)
    assert call(app, "GET", "/v1/n/42").body == b"n"
    assert call(app, "GET", "/v1/n/x").body == b"inner"
    assert h.seen == [("n", {"n": 42})]
