"""The frontend's ASGI application: routes of the data plane, wired to scheduler and rings."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp

from ipc import protocol as p
from ipc.proc import freeze_startup_heap
from orchd import log
from orchd.config import Resolved, effective_api_keys
from orchd.core.errors import Code, OrchdError
from orchd.frontend import openai
from orchd.frontend.client import SchedulerClient
from orchd.frontend.control import routes as control_routes
from orchd.frontend.http import JSON, error_response, read_body
from orchd.frontend.middleware import ApiKeys, CorrelationId, FastRoute, FastRoutes
from orchd.frontend.openai import OpenAIRoutes
from orchd.frontend.schema import parse_task
from orchd.frontend.sse import SSEResponse
from orchd.frontend.streams import Stream, StreamTable
from orchd.frontend.tally import Tally
from orchd.frontend.tenancy import local_error, scope_spec, scoped, tenant


def budget_headers(b: p.Budgets) -> dict[str, str]:
    def fmt(v: float | None) -> str:
        return "unlimited" if v is None else (f"{v:g}" if isinstance(v, float) else str(v))

    return {
        "X-Budget-Tokens-Remaining": fmt(b.tokens),
        "X-Budget-Time-Remaining-Ms": fmt(b.time_ms),
        "X-Budget-Cost-Remaining": fmt(b.cost),
    }


class Frontend:
    """Everything one frontend process holds: its scheduler line, its streams, its metrics."""

    def __init__(self, res: Resolved, index: int) -> None:
        self.res = res
        self.cfg = res.config
        self.index = index
        rt = res.runtime
        self.client = SchedulerClient(
            rt.scheduler_addr, index, self.cfg.server.heartbeat_ms / 1000.0
        )
        self.table = StreamTable(
            [rt.ring_name(i, index) for i in range(len(self.cfg.replicas))],
            rt.bell_path(index),
            max_streams=self.cfg.limits.max_streams,
            buffer_limit=self.cfg.limits.stream_buffer_bytes,
            on_overflow=self._on_overflow,
            provisional_ttl_s=self.cfg.limits.transcript_retention_ms / 1000.0,
        )
        self.table.reply = self.client.send
        self.client.on_notice = self.table.on_notice
        # frontend_streams_open, frontend_client_disconnects_total, frontend_stream_overflows_total
        self.m_open, self.m_disconnects, self.m_overflow = Tally(), Tally(), Tally()
        self._stats_timer: asyncio.TimerHandle | None = None
        self.key_streams: dict[str, int] = {}  # key id -> streams open here
        self.stream_keys: dict[int, str] = {}  # stream slot -> the key that opened it
        self.stream_conns: dict[int, Any] = {}  # slot -> its connection (edge.EdgeProtocol)

    # ---------------------------------------------------------------- lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        log.defer(lambda: loop.call_soon(log.flush))
        await self.client.start()
        self._report_stats(loop)
        self.table.start()
        freeze_startup_heap()
        log.info("frontend ready", frontend=self.index, pid=os.getpid())
        try:
            yield
        finally:
            if self._stats_timer is not None:
                self._stats_timer.cancel()
            self.table.stop()
            await self.client.stop()

    # ---------------------------------------------------------------- handlers

    async def submit(self, request: Request) -> Response:
        s = None
        kid = request.scope["state"]["api_key_id"]
        try:
            body = await read_body(request, self.cfg.limits.max_body_bytes)
            spec = parse_task(body, self.cfg.limits, kid)
            client_task_id = spec.task_id
            scope_spec(spec, kid)  # t-0 is <key id>/t-0 inside orchd
            # Feed a stream here from the start: a GET on this frontend then costs no round
            # trip, and its first bytes are already waiting.
            s = self.table.open_provisional(spec.task_id)
            fe, slot = (self.index, s.slot) if s is not None else (-1, 0)
            reply = await self.client.request(p.Submit(self.client.next_id(), spec, fe, slot))
        except OrchdError as e:
            if s is not None:
                self.table.drop_provisional(s)
            return error_response(local_error(e, kid))
        assert isinstance(reply, p.Admitted)
        if s is not None:
            s.budgets = reply.budgets
        return JSON(
            {
                "task_id": client_task_id,
                "queue_position": reply.queue_position,
                "predicted_start_ms": reply.predicted_start_ms,
                "backoff_ms": reply.backoff_ms,
            },
            status_code=202,
            headers=budget_headers(reply.budgets),
        )

    async def stream(self, request: Request) -> Response | SSEResponse:
        try:
            owner = tenant(request)
            kid = request.scope["state"]["api_key_id"]
            self.key_stream_room(request, kid)
        except OrchdError as e:
            return error_response(e)
        task_id = scoped(owner, request.path_params["task_id"])
        s = self.table.claim(task_id)
        if s is not None and s.budgets is not None:
            self.client.send(p.Claim(task_id))
            return self._sse(request, s, kid, self.budget_header_list(s.budgets))
        if s is not None:  # admitted but its reply not yet seen: go the ordinary way
            self.table.close(s)
        try:
            s = self.table.open(task_id)
        except OrchdError as e:
            return error_response(e)
        try:
            reply = await self.client.request(
                p.Subscribe(self.client.next_id(), task_id, self.index, s.slot)
            )
        except OrchdError as e:
            self.table.close(s)
            return error_response(local_error(e, owner))
        assert isinstance(reply, p.Subscribed)
        return self._sse(request, s, kid, self.budget_header_list(reply.budgets))

    def key_stream_room(self, request: Request, kid: str) -> None:
        """A key may hold so many streams on this frontend (its own cap, else the default)."""
        cap = request.scope["state"].get("api_key_max_streams") or (
            self.cfg.limits.max_streams_per_key
        )
        if cap and self.key_streams.get(kid, 0) >= cap:
            raise OrchdError(
                Code.ADMISSION_REJECT,
                f"this API key has {cap} streams open on this frontend, its limit; "
                "close one or wait for one to end",
                retry_after_ms=1000,
                policy_label="max_streams_per_key",
            )

    def _sse(
        self, request: Request, s: Stream, kid: str, headers: list[tuple[bytes, bytes]]
    ) -> SSEResponse:
        self.opened(request, s, kid)
        return SSEResponse(s, headers, self.stream_done)

    def opened(self, request: Request, s: Stream, kid: str) -> None:
        """A stream (or a whole response) is now a client's: counted until it is done."""
        self.m_open.inc()
        self.key_streams[kid] = self.key_streams.get(kid, 0) + 1
        self.stream_keys[s.slot] = kid
        conn = request.scope.get("extensions", {}).get("orchd.conn")  # edge.py
        if conn is not None:
            self.stream_conns[s.slot] = conn["handle"]
        log.info("stream opened", task_id=s.task_id, frontend=self.index, slot=s.slot)

    @staticmethod
    def budget_header_list(b: p.Budgets) -> list[tuple[bytes, bytes]]:
        return [(k.lower().encode(), v.encode()) for k, v in budget_headers(b).items()]

    def stream_done(self, s: Stream) -> None:
        """Its response has returned: the socket is closed, or the stream's end is on it."""
        left_early = not s.sent_terminal
        self.table.close(s)
        conn = self.stream_conns.pop(s.slot, None)
        kid = self.stream_keys.pop(s.slot, "")
        left = self.key_streams.get(kid, 0) - 1
        if left > 0:
            self.key_streams[kid] = left
        else:
            self.key_streams.pop(kid, None)
        if s.overflow and conn is not None:
            # Cut off for reading too slowly: what was sent may still wait in the socket's
            # buffers. The stream counts as open until its socket is closed: gracefully if
            # the client drains it, else after limits.stall_timeout_ms (_on_overflow).
            conn.on_lost(self.m_open.dec)
            conn.close_after_flush()
        else:
            self.m_open.dec()
        if left_early:
            self.m_disconnects.inc()
            log.info("client left mid-stream: canceling", task_id=s.task_id)
            self.client.send(p.Cancel(0, s.task_id, "client_disconnect"))

    def _on_overflow(self, s: Stream) -> None:
        self.m_overflow.inc()
        err = OrchdError(
            Code.STREAM_OVERFLOW,
            f"client read too slowly: more than {self.cfg.limits.stream_buffer_bytes} bytes "
            "were waiting; the task was canceled",
        )
        s.fail(err)
        self.client.send(p.Cancel(0, s.task_id, "slow_client"))
        # A client that reads on gets the error frame; one that stopped reading has its
        # connection closed (the stream stays open, and counted, until then).
        conn = self.stream_conns.get(s.slot)
        if conn is not None:
            asyncio.get_running_loop().call_later(
                self.cfg.limits.stall_timeout_ms / 1000.0, self._close_stalled, s.slot, conn
            )

    def _close_stalled(self, slot: int, conn: Any) -> None:
        if not conn.lost:
            log.info("closing the connection of a stream that stopped reading", slot=slot)
            conn.abort()

    async def cancel(self, request: Request) -> Response:
        try:
            owner = tenant(request)
        except OrchdError as e:
            return error_response(e)
        task_id = scoped(owner, request.path_params["task_id"])
        try:
            await self.client.request(p.Cancel(self.client.next_id(), task_id, "client"))
        except OrchdError as e:
            return error_response(local_error(e, owner))
        return Response(status_code=204)

    def _stats(self) -> p.FrontendStats:
        v = (self.m_open.value, self.m_disconnects.value, self.m_overflow.value)
        return p.FrontendStats(self.index, *v)

    def _report_stats(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every heartbeat, this frontend's counters to the scheduler (a restarted scheduler
        has them again within one beat)."""
        self.client.send(self._stats())
        self._stats_timer = loop.call_later(
            self.cfg.server.heartbeat_ms / 1000.0, self._report_stats, loop
        )

    async def metrics(self, request: Request) -> Response:
        try:
            self.client.send(self._stats())  # ours, current; the others' are at most 1 beat old
            reply = await self.client.request(p.MetricsQuery(self.client.next_id()))
        except OrchdError as e:
            return error_response(e)
        assert isinstance(reply, p.MetricsText)
        return Response(reply.text, media_type="text/plain; version=0.0.4; charset=utf-8")

    # ---------------------------------------------------------------- the app

    def routes(self) -> list[BaseRoute]:
        """Every route of this frontend, defined once: Starlette routes them all, and
        :class:`FastRoutes` serves the ones marked fast ahead of it."""
        return [
            FastRoute("/v1/tasks", self.submit, methods=["POST"]),
            FastRoute("/v1/tasks/{task_id}/stream", self.stream, methods=["GET"]),
            Route("/v1/tasks/{task_id}/cancel", self.cancel, methods=["POST"]),
            Route("/metrics", self.metrics, methods=["GET"]),
            *control_routes(self.client, self.cfg.limits.max_body_bytes),
            *OpenAIRoutes(self).routes(),
        ]

    def app(self) -> ASGIApp:
        routes = self.routes()
        star = Starlette(
            routes=routes,
            lifespan=self.lifespan,
            exception_handlers={404: _not_found, 405: _not_allowed(routes), Exception: _internal},
        )
        fast = FastRoutes(star, routes, on_error=_internal)
        keys = ApiKeys(fast, effective_api_keys(self.cfg), respond=_refusal)
        return CorrelationId(keys, self.index)


def _refusal(path: str, err: OrchdError) -> Response:
    return openai.error_response(err) if openai.is_openai(path) else error_response(err)


async def _not_found(request: Request, exc: Exception) -> Response:
    return _refusal(
        request.url.path, OrchdError(Code.NOT_FOUND, f"no route for {request.url.path}")
    )


async def _internal(request: Request, exc: Exception) -> Response:
    log.error("unhandled error", path=request.url.path, error=repr(exc))
    return error_response(OrchdError(Code.INTERNAL, "internal error; see the server log"))


def _not_allowed(routes: list[BaseRoute]) -> Callable[[Request, Exception], Awaitable[Response]]:
    """405 with ``Allow``: every method some route serves at this path."""

    async def handler(request: Request, exc: Exception) -> Response:
        path = request.scope["path"]
        allow = sorted(
            {
                m
                for r in routes
                if isinstance(r, Route) and r.methods and r.path_regex.match(path)
                for m in r.methods
            }
        )
        e = OrchdError(Code.INVALID_PARAMS, f"method {request.method} not allowed here")
        resp = error_response(e, {"Allow": ", ".join(allow)})
        resp.status_code = 405
        return resp

    return handler
