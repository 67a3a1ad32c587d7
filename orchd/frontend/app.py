"""The frontend's ASGI application: routes of the data plane, wired to scheduler and rings."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
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
        self.registry = CollectorRegistry()
        fl = [str(index)]
        self.m_open = Gauge(
            "frontend_streams_open", "Open SSE streams.", ["frontend"], registry=self.registry
        ).labels(*fl)
        self.m_disconnects = Counter(
            "frontend_client_disconnects",
            "Streams whose client left before the end.",
            ["frontend"],
            registry=self.registry,
        ).labels(*fl)
        self.m_overflow = Counter(
            "frontend_stream_overflows",
            "Streams cut off because their client read too slowly.",
            ["frontend"],
            registry=self.registry,
        ).labels(*fl)

    # ---------------------------------------------------------------- lifecycle

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        log.defer(lambda: loop.call_soon(log.flush))
        await self.client.start()
        self.table.start()
        freeze_startup_heap()
        log.info("frontend ready", frontend=self.index, pid=os.getpid())
        try:
            yield
        finally:
            self.table.stop()
            await self.client.stop()

    # ---------------------------------------------------------------- handlers

    async def submit(self, request: Request) -> Response:
        s = None
        try:
            body = await read_body(request, self.cfg.limits.max_body_bytes)
            spec = parse_task(body, self.cfg.limits, request.scope["state"]["api_key_id"])
            # Feed a stream here from the start: a GET on this frontend then costs no round
            # trip, and its first bytes are already waiting.
            s = self.table.open_provisional(spec.task_id)
            fe, slot = (self.index, s.slot) if s is not None else (-1, 0)
            reply = await self.client.request(p.Submit(self.client.next_id(), spec, fe, slot))
        except OrchdError as e:
            if s is not None:
                self.table.drop_provisional(s)
            return error_response(e)
        assert isinstance(reply, p.Admitted)
        if s is not None:
            s.budgets = reply.budgets
        return JSON(
            {
                "task_id": reply.task_id,
                "queue_position": reply.queue_position,
                "predicted_start_ms": reply.predicted_start_ms,
                "backoff_ms": reply.backoff_ms,
            },
            status_code=202,
            headers=budget_headers(reply.budgets),
        )

    async def stream(self, request: Request) -> Response | SSEResponse:
        task_id = request.path_params["task_id"]
        s = self.table.claim(task_id)
        if s is not None and s.budgets is not None:
            self.client.send(p.Claim(task_id))
            self.m_open.inc()
            log.info("stream opened", task_id=task_id, frontend=self.index, slot=s.slot)
            return SSEResponse(s, self.budget_header_list(s.budgets), self.stream_done)
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
            return error_response(e)
        assert isinstance(reply, p.Subscribed)
        self.m_open.inc()
        log.info("stream opened", task_id=task_id, frontend=self.index, slot=s.slot)
        return SSEResponse(s, self.budget_header_list(reply.budgets), self.stream_done)

    @staticmethod
    def budget_header_list(b: p.Budgets) -> list[tuple[bytes, bytes]]:
        return [(k.lower().encode(), v.encode()) for k, v in budget_headers(b).items()]

    def stream_done(self, s: Stream) -> None:
        left_early = not s.sent_terminal
        self.table.close(s)
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

    async def cancel(self, request: Request) -> Response:
        task_id = request.path_params["task_id"]
        try:
            await self.client.request(p.Cancel(self.client.next_id(), task_id, "client"))
        except OrchdError as e:
            return error_response(e)
        return Response(status_code=204)

    async def metrics(self, request: Request) -> Response:
        try:
            reply = await self.client.request(p.MetricsQuery(self.client.next_id()))
        except OrchdError as e:
            return error_response(e)
        assert isinstance(reply, p.MetricsText)
        text = reply.text + generate_latest(self.registry)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

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
            exception_handlers={404: _not_found, 405: _not_allowed, Exception: _internal},
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


async def _not_allowed(request: Request, exc: Exception) -> Response:
    e = OrchdError(Code.INVALID_PARAMS, f"method {request.method} not allowed here")
    resp = error_response(e)
    resp.status_code = 405
    return resp
