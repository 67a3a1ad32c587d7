"""The OpenAI-compatible routes: ``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``, ``/v1/embeddings``.

Each request is a task on the same machinery as orchd's own API: admission, queue, fairness,
sessions and budgets, placement by ``model``, drain, metrics and transcripts. Its bytes are
encoded once by the supervisor in OpenAI's shapes (engine_procs/codecs.py): a streamed
request is fed from the rings exactly as a native stream is, and a request that does not
stream gets one terminal record holding the whole response, so this frontend never parses
a token. A client that goes away from a stream detaches it, as a native client's disconnect
does: the task runs on for ``limits.resume_grace_ms``, and ``GET /v1/tasks/{id}/stream`` (``id``
being the chunks' ``id``) with ``Last-Event-ID`` resumes it in the same OpenAI chunks. One that
leaves a request that does not stream cancels it at once (there is nothing to resume).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from ipc import protocol as p
from orchd import log
from orchd.core.errors import Code, OrchdError, openai_error
from orchd.frontend.http import JSON, read_body
from orchd.frontend.middleware import tag_task
from orchd.frontend.openai_schema import parse
from orchd.frontend.sse import SSEResponse, watch_disconnect
from orchd.frontend.streams import Stream
from orchd.frontend.tenancy import local_error, scoped

if TYPE_CHECKING:
    from orchd.frontend.app import Frontend

# Paths whose errors take OpenAI's shape (auth and unknown routes included).
PREFIXES = ("/v1/chat/", "/v1/completions", "/v1/embeddings", "/v1/models")


def is_openai(path: str) -> bool:
    return path.startswith(PREFIXES)


def error_response(e: OrchdError) -> Response:
    headers = {}
    if e.retry_after_ms is not None and e.status in (429, 503):
        headers["Retry-After"] = str(max(1, -(-e.retry_after_ms // 1000)))
    return JSON(e.openai(), status_code=e.status, headers=headers)


class BodyResponse:
    """The response of a request that does not stream: wait for the task's terminal record
    (the whole body), send it. A client that leaves first cancels the task."""

    def __init__(self, stream: Stream, on_done: Callable[[Stream], None]) -> None:
        self.stream = stream
        self.on_done = on_done

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        s = self.stream
        loop = asyncio.get_running_loop()
        watcher = watch_disconnect(receive, s)
        try:
            while not s.terminal and not s.client_gone:
                s.waiter = loop.create_future()
                await s.waiter
            if s.client_gone:
                return
            body = bytes(s.buf)
            status = 200
            if body.startswith(b'{"error"'):  # one parse per failed request, none per token
                status = _status(body)
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            s.mark_sent()
        finally:
            watcher.cancel()
            self.on_done(s)


def _status(body: bytes) -> int:
    try:
        code = msgspec.json.decode(body)["error"]["code"]
        return OrchdError(code, "").status
    except (ValueError, KeyError, TypeError):
        return 500


class OpenAIRoutes:
    """The handlers, on one frontend's scheduler line and stream table."""

    def __init__(self, fe: Frontend) -> None:
        self.fe = fe

    def routes(self) -> list[Route]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", self.model, methods=["GET"]),
            Route("/v1/chat/completions", self.chat, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/embeddings", self.embeddings, methods=["POST"]),
        ]

    async def _models(self, request: Request) -> list[dict[str, Any]]:
        client = self.fe.client
        key = request.scope["state"].get("api_key_id", "")
        reply = await client.request(p.Query(client.next_id(), "models.list", {}, key))
        assert isinstance(reply, p.Reply)
        data: list[dict[str, Any]] = reply.body["data"]
        return data

    async def models(self, request: Request) -> Response:
        try:
            return JSON({"object": "list", "data": await self._models(request)})
        except OrchdError as e:
            return error_response(e)

    async def model(self, request: Request) -> Response:
        mid = request.path_params["model_id"]
        try:
            for m in await self._models(request):
                if mid in (m["id"], m["root"]):
                    return JSON(m)
            raise OrchdError(Code.NOT_FOUND, f"model {mid!r} is not served here", param="model")
        except OrchdError as e:
            return error_response(e)

    async def chat(self, request: Request) -> Response | SSEResponse | BodyResponse:
        return await self._task(request, "chat")

    async def completions(self, request: Request) -> Response | SSEResponse | BodyResponse:
        return await self._task(request, "completions")

    async def embeddings(self, request: Request) -> Response | SSEResponse | BodyResponse:
        return await self._task(request, "embeddings")

    async def _task(self, request: Request, api: str) -> Response | SSEResponse | BodyResponse:
        fe = self.fe
        s = None
        kid = request.scope["state"]["api_key_id"]
        try:
            fe.key_stream_room(request, kid)
            body = await read_body(request, fe.cfg.limits.max_body_bytes)
            spec = parse(body, api, fe.cfg.limits, kid)
            # Its task and session are the key's own, as native ones are: the chunks' ``id``
            # names the task for a resume (GET /v1/tasks/{id}/stream with Last-Event-ID).
            spec.task_id = scoped(kid, spec.task_id)
            spec.session_id = scoped(kid, spec.session_id)
            tag_task(request.scope, spec, spec.task_id)
            s = fe.table.open_provisional(spec.task_id, "openai" if spec.stream else "body")
            if s is None:
                raise OrchdError(
                    Code.REPLICA_EXHAUSTED,
                    f"this frontend already serves {fe.cfg.limits.max_streams} streams",
                    retry_after_ms=1000,
                )
            msg = p.Submit(fe.client.next_id(), spec, fe.index, s.slot)
            reply = await fe.client.request(msg)
        except OrchdError as e:
            if s is not None:
                fe.table.drop_provisional(s)
            return error_response(local_error(e, kid))
        assert isinstance(reply, p.Admitted)
        claimed = fe.table.claim(spec.task_id)
        assert claimed is s
        fe.client.send(p.Claim(spec.task_id))
        fe.opened(request, s, kid)
        log.info("openai request admitted", task_id=spec.task_id, api=api, model=spec.model)
        if spec.stream:
            return SSEResponse(s, fe.budget_header_list(reply.budgets), fe.stream_done)
        return BodyResponse(s, fe.stream_done)


def not_found(path: str) -> Response:
    return JSON(
        openai_error({"code": Code.NOT_FOUND.value, "message": f"no route for {path}"}),
        status_code=404,
    )
