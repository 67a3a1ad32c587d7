"""Control-plane and session routes: thin translations of HTTP into scheduler ``Query`` ops.

Pools and catalog writes (``ADMIN_OPS``) need an admin key; sessions and artifacts are the
caller's own (or, for an admin, ``?tenant=``'s: orchd/frontend/tenancy.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from ipc import protocol as p
from orchd.core.artifacts import canonical, check_kind
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
from orchd.frontend.tenancy import local_error, require_admin, scoped, tenant, unscoped

RELOAD_TIMEOUT_S = 600.0
Handler = Callable[[Request], Awaitable[Response]]
# The control plane: a client key gets 403.
ADMIN_OPS = frozenset(
    {
        "pool.health",
        "pool.drain",
        "pool.reload",
        "pool.undrain",
        "pool.list",
        "catalog.create",
        "catalog.delete",
        "catalog.state",
        "catalog.verify",
    }
)
# Ops on the caller's own (or ?tenant='s) records; their id parameters are namespaced.
TENANT_OPS = {"session.get": "session_id", "session.delete": "session_id", "task.get": "task_id"}


def routes(client: SchedulerClient, max_body: int) -> list[Route]:
    async def ask(
        op: str, args: dict[str, Any], request: Request, timeout: float = 10.0, key: str = ""
    ) -> Response:
        key = key or request.scope["state"].get("api_key_id", "")
        try:
            reply = await client.request(p.Query(client.next_id(), op, args, key), timeout)
        except OrchdError as e:
            raise local_error(e, key) from None
        assert isinstance(reply, p.Reply)
        if reply.status == 204:
            return Response(status_code=204)
        body = reply.body
        if op in TENANT_OPS and isinstance(body, dict) and TENANT_OPS[op] in body:
            body[TENANT_OPS[op]] = unscoped(body[TENANT_OPS[op]])
        return JSON(body, status_code=reply.status)

    def handler(
        op: str,
        body: type[msgspec.Struct] | None = None,
        params: tuple[str, ...] = (),
        timeout: float = 10.0,
    ) -> Handler:
        async def handle(request: Request) -> Response:
            try:
                if op in ADMIN_OPS:
                    require_admin(request, "the control plane")
                owner = tenant(request) if op in TENANT_OPS else ""
                args: dict[str, Any] = {}
                if body is not None:
                    args = parse_body(await read_body(request, max_body), body)
                for name in params:
                    args[name] = request.path_params[name]
                if owner:
                    args[TENANT_OPS[op]] = scoped(owner, args[TENANT_OPS[op]])
                return await ask(op, args, request, timeout, owner)
            except OrchdError as e:
                return error_response(e)

        return handle

    async def put_artifact(request: Request) -> Response:
        try:
            a = parse_body(await read_body(request, max_body), ArtifactBody)
            try:
                doc = canonical(a["kind"], a["content"], a["tags"], a["parent"], a["metadata"])
            except (OverflowError, msgspec.EncodeError) as e:
                raise OrchdError(Code.INVALID_PARAMS, f"content: {e}") from None
            return await ask("artifact.put", {"doc": doc, "parent": a["parent"]}, request)
        except OrchdError as e:
            return error_response(e)

    async def get_artifact(request: Request) -> Response:
        aid = request.path_params["artifact_id"]
        try:
            if not aid.startswith("sha256:"):
                raise OrchdError(Code.NOT_FOUND, f"no artifact {aid!r}")
            # shown only to a key that put it (or ran its task)
            return await ask("artifact.get", {"id": aid}, request, key=tenant(request))
        except OrchdError as e:
            return error_response(e)

    async def list_artifacts(request: Request) -> Response:
        """The caller's artifacts (or ``?tenant=``'s), newest first, filtered by ``kind``,
        ``tag`` and ``parent`` where given."""
        try:
            key = tenant(request)
            qp = request.query_params
            args = {k: qp[k] for k in ("kind", "tag", "parent") if k in qp}
            if "kind" in args:
                check_kind(args["kind"])
            return await ask("artifact.list", args, request, key=key)
        except OrchdError as e:
            return error_response(e)

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
        Route(
            "/v1/pools/{pool_id}/undrain",
            handler("pool.undrain", None, ("pool_id",)),
            methods=["POST"],
        ),
        Route("/v1/pools", handler("pool.list"), methods=["GET"]),
        Route("/v1/tasks/{task_id}", handler("task.get", None, ("task_id",)), methods=["GET"]),
        Route("/v1/capabilities", handler("capabilities"), methods=["GET"]),
        Route("/v1/catalog/models", handler("catalog.list"), methods=["GET"]),
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
        Route("/v1/artifacts", list_artifacts, methods=["GET"]),
        Route("/v1/artifacts/{artifact_id:path}", get_artifact, methods=["GET"]),
    ]
