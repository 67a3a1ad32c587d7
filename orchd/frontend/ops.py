"""The operator's routes: open probes (``/healthz``, ``/readyz``, ``/version``), the operator
page's static files (``/ui``) and its live feed (``GET /v1/admin/live``, admin key).

Which probe for what (README, "Health and the operator page"): ``/healthz`` answers while the
process serves HTTP (Kubernetes liveness); ``/readyz`` is 200 only while some replica can take
a task (load balancer health check, Kubernetes readiness); ``/version`` says what runs.

The page is three static files served from memory with a strict Content-Security-Policy (no
script, style or connection to another origin: it works offline); they load without a key,
and everything they show comes from keyed routes: the page asks for an admin key and sends it
as ``X-API-Key``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import platform
from collections.abc import Callable
from importlib import resources
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

import orchd
from ipc import protocol as p
from orchd import log
from orchd.build_info import git_sha
from orchd.core.control import API_VERSION
from orchd.core.errors import Code, OrchdError
from orchd.frontend.client import SchedulerClient
from orchd.frontend.http import JSON, error_response
from orchd.frontend.sse import SSE_HEADERS
from orchd.frontend.tenancy import require_admin

PROBE_TIMEOUT_S = 2.0  # /readyz and /version wait this long for the scheduler
LIVE_INTERVAL_S = 1.0  # the live feed sends a snapshot this often
LIVE_QUERY_TIMEOUT_S = 5.0  # ... each asked of the scheduler within this long
LIVE_MAX_STREAMS = 16  # live feeds open at once per frontend; beyond: 429
GIT_TIMEOUT_S = 2.0
UI_PACKAGE = "orchd.frontend"
UI_DIR = "ui"
UI_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# Same origin only: the page works with no network beyond orchd, and injected markup cannot
# load or send anything elsewhere.
UI_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_json = msgspec.json.Encoder()


# ---------------------------------------------------------------- what runs


def build_info() -> dict[str, str]:
    return {
        "version": orchd.__version__,
        "git_sha": git_sha(),
        "python": platform.python_version(),
        "api_version": API_VERSION,
    }


# ---------------------------------------------------------------- the page's files


@functools.cache
def ui_files() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, content type) of every file of the page (package data)."""
    out = {}
    for entry in resources.files(UI_PACKAGE).joinpath(UI_DIR).iterdir():
        ctype = UI_TYPES.get(os.path.splitext(entry.name)[1])
        if ctype is not None and entry.is_file():
            out[entry.name] = (entry.read_bytes(), ctype)
    return out


# ---------------------------------------------------------------- the live feed


class LiveFeed:
    """``GET /v1/admin/live``: an SSE stream of ``live`` events, one scheduler snapshot
    (orchd/core/live.py) every ``LIVE_INTERVAL_S``; the first carries each GPU's history.
    A snapshot the scheduler does not give in time is an ``error`` event, and the feed goes
    on. The feed ends after the snapshot that says orchd is shutting down."""

    def __init__(self, client: SchedulerClient, key: str, on_done: Callable[[], None]) -> None:
        self.client = client
        self.key = key
        self.on_done = on_done

    async def snapshot(self, history: bool) -> tuple[bytes, bool]:
        """One SSE frame, and whether the feed should go on."""
        try:
            reply = await self.client.request(
                p.Query(self.client.next_id(), "admin.live", {"history": history}, self.key),
                LIVE_QUERY_TIMEOUT_S,
            )
        except OrchdError as e:
            return b"event: error\ndata: " + _json.encode(e.envelope()) + b"\n\n", True
        assert isinstance(reply, p.Reply)
        go_on = bool(reply.body.get("admitting", True))
        return b"event: live\ndata: " + _json.encode(reply.body) + b"\n\n", go_on

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                continue
            gone.set()

        watcher = loop.create_task(watch())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            history = True
            go_on = True
            while go_on and not gone.is_set():
                started = loop.time()
                frame, go_on = await self.snapshot(history)
                history = history and frame.startswith(b"event: error")
                await send({"type": "http.response.body", "body": frame, "more_body": True})
                if go_on:
                    left = LIVE_INTERVAL_S - (loop.time() - started)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(gone.wait(), max(0.0, left))
            if not gone.is_set():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            self.on_done()


# ---------------------------------------------------------------- routes


def routes(client: SchedulerClient, index: int) -> list[Route]:
    live_open = [0]  # live feeds open on this frontend

    async def healthz(request: Request) -> Response:
        return JSON({"status": "ok", "frontend": index, "pid": os.getpid()})

    async def readyz(request: Request) -> Response:
        try:
            reply = await client.request(p.Query(client.next_id(), "ready", {}), PROBE_TIMEOUT_S)
        except OrchdError as e:
            body = {
                "ready": False,
                "replicas": 0,
                "ready_replicas": 0,
                "not_ready": [],
                "reason": f"the scheduler did not answer: {e.message}",
            }
            return JSON(body, status_code=503)
        assert isinstance(reply, p.Reply)
        return JSON(reply.body, status_code=reply.status)

    async def version(request: Request) -> Response:
        body: dict[str, Any] = {**build_info(), "engines": []}
        try:
            reply = await client.request(
                p.Query(client.next_id(), "capabilities", {}), PROBE_TIMEOUT_S
            )
        except OrchdError as e:
            body["engines_error"] = f"the scheduler did not answer: {e.message}"
            return JSON(body)
        assert isinstance(reply, p.Reply)
        body["engines"] = [
            {k: e[k] for k in ("pool_id", "engine", "engine_version", "model_ref")}
            for e in reply.body["engines"]
        ]
        return JSON(body)

    async def live(request: Request) -> Response | LiveFeed:
        try:
            require_admin(request, "the operator page's live view")
            if live_open[0] >= LIVE_MAX_STREAMS:
                raise OrchdError(
                    Code.ADMISSION_REJECT,
                    f"{LIVE_MAX_STREAMS} live views are open on this frontend, its limit",
                    retry_after_ms=5000,
                    policy_label="live_max_streams",
                )
        except OrchdError as e:
            return error_response(e)
        live_open[0] += 1
        log.info("live view opened", frontend=index, open=live_open[0])

        def done() -> None:
            live_open[0] -= 1

        return LiveFeed(client, request.scope["state"].get("api_key_id", ""), done)

    async def ui_file(request: Request) -> Response:
        name = request.path_params.get("name", "index.html")
        found = ui_files().get(name)
        if found is None:
            return error_response(OrchdError(Code.NOT_FOUND, f"no file {name!r} in /ui"))
        data, ctype = found
        return Response(data, media_type=ctype, headers=UI_HEADERS)

    async def root(request: Request) -> Response:
        return RedirectResponse("/ui", status_code=307)

    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/version", version, methods=["GET"]),
        Route("/v1/admin/live", live, methods=["GET"]),
        Route("/ui", ui_file, methods=["GET"]),
        Route("/ui/", ui_file, methods=["GET"]),
        Route("/ui/{name}", ui_file, methods=["GET"]),
        Route("/", root, methods=["GET"]),
    ]
