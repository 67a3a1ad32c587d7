"""Control-plane and session routes: thin translations of HTTP into scheduler ``Query`` ops."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ipc import protocol as p
from orchd.core.artifacts import canonical
from orchd.core.errors import Code, OrchdError
from orchd.frontend.client import SchedulerClient
from orchd.frontend.http import JSON, error_response, read_body
from orchd.frontend.schema import (
    ArtifactBody,
    DrainBody,
    ModelBody,
    ReloadBody,
    StateBody,
    parse_body,
)

RELOAD_TIMEOUT_S = 600.0
Handler = Callable[[Request], Awaitable[Response]]


def routes(client: SchedulerClient, max_body: int) -> list[Route]:
    async def ask(
        op: str, args: dict[str, Any], request: Request, timeout: float = 10.0
    ) -> Response:
        key = request.scope["state"].get("api_key_id", "")
        reply = await client.request(p.Query(client.next_id(), op, args, key), timeout)
        assert isinstance(reply, p.Reply)
        if reply.status == 204:
            return Response(status_code=204)
        return JSON(reply.body, status_code=reply.status)

    def handler(
        op: str,
        body: type[msgspec.Struct] | None = None,
        params: tuple[str, ...] = (),
        timeout: float = 10.0,
    ) -> Handler:
        async def handle(request: Request) -> Response:
            try:
                args: dict[str, Any] = {}
                if body is not None:
                    args = parse_body(await read_body(request, max_body), body)
                for name in params:
                    args[name] = request.path_params[name]
                return await ask(op, args, request, timeout)
            except OrchdError as e:
                return error_response(e)

        return handle

    async def put_artifact(request: Request) -> Response:
        try:
            a = parse_body(await read_body(request, max_body), ArtifactBody)
            try:
                doc = canonical(a["kind"], a["content"])
            except (OverflowError, msgspec.EncodeError) as e:
                raise OrchdError(Code.INVALID_PARAMS, f"content: {e}") from None
            return await ask("artifact.put", {"doc": doc}, request)
        except OrchdError as e:
            return error_response(e)

    async def get_artifact(request: Request) -> Response:
        aid = request.path_params["artifact_id"]
        try:
            if not aid.startswith("sha256:"):
                raise OrchdError(Code.NOT_FOUND, f"no artifact {aid!r}")
            key = request.scope["state"].get("api_key_id", "")
            reply = await client.request(
                p.Query(client.next_id(), "artifact.get", {"id": aid}, key)
            )
        except OrchdError as e:
            return error_response(e)
        assert isinstance(reply, p.Reply)
        doc = msgspec.json.decode(reply.body)
        return JSON({"id": aid, "kind": doc["kind"], "content": doc["content"]})

    model = ("model_id",)
    return [
        Route(
            "/v1/sessions/{session_id}",
            handler("session.get", None, ("session_id",)),
            methods=["GET"],
        ),
        Route(
            "/v1/sessions/{session_id}",
            handler("session.delete", None, ("session_id",)),
            methods=["DELETE"],
        ),
        Route(
            "/v1/pools/{pool_id}/health",
            handler("pool.health", None, ("pool_id",)),
            methods=["GET"],
        ),
        Route(
            "/v1/pools/{pool_id}/drain",
            handler("pool.drain", DrainBody, ("pool_id",)),
            methods=["POST"],
        ),
        Route(
            "/v1/pools/{pool_id}/reload",
            handler("pool.reload", ReloadBody, ("pool_id",), RELOAD_TIMEOUT_S),
            methods=["POST"],
        ),
        Route("/v1/capabilities", handler("capabilities"), methods=["GET"]),
        Route("/v1/catalog/models", handler("catalog.create", ModelBody), methods=["POST"]),
        Route(
            "/v1/catalog/models/{model_id}", handler("catalog.get", None, model), methods=["GET"]
        ),
        Route(
            "/v1/catalog/models/{model_id}",
            handler("catalog.delete", None, model),
            methods=["DELETE"],
        ),
        Route(
            "/v1/catalog/models/{model_id}/verify",
            handler("catalog.verify", None, model),
            methods=["POST"],
        ),
        Route(
            "/v1/catalog/models/{model_id}/state",
            handler("catalog.state", StateBody, model),
            methods=["POST"],
        ),
        Route("/v1/artifacts", put_artifact, methods=["POST"]),
        Route("/v1/artifacts/{artifact_id:path}", get_artifact, methods=["GET"]),
    ]
