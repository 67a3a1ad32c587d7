"""The ceiling baseline: a bare uvicorn + starlette SSE endpoint that yields the same frames
orchd sends, from memory, one event per write, with no IPC at all.

    python -m perf.ceiling --port 9000
    GET /stream/{n}  ->  started, n token frames, end
"""

from __future__ import annotations

import argparse
import socket
from collections.abc import AsyncIterator

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from engine_procs.mock_engine import vocab
from ipc.frames import end_frame, frame, json_string, token_frame

_VOCAB = [json_string(w) for w in vocab(512)]
_STARTED = frame(
    "started",
    0,
    {
        "queue_position": 1,
        "predicted_start_ms": 0,
        "engine": "mock",
        "engine_version": "mock-1.0",
        "pool_id": "default",
        "replica_id": "r0",
    },
)


async def _events(n: int) -> AsyncIterator[bytes]:
    yield _STARTED
    for i in range(n):
        yield token_frame(i + 1, i, _VOCAB[i % len(_VOCAB)])
    yield end_frame(n + 1, n, 0.0, 0.0, "length")


async def stream(request: Request) -> Response:
    n = int(request.path_params["n"])
    return StreamingResponse(
        _events(n),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def admit(request: Request) -> Response:
    """The admission baseline: parse the same JSON body and answer 202."""
    import msgspec

    body = msgspec.json.decode(await request.body())
    return Response(
        msgspec.json.encode({"task_id": body["task_id"], "queue_position": 1}),
        status_code=202,
        media_type="application/json",
    )


app = Starlette(
    routes=[
        Route("/stream/{n:int}", stream, methods=["GET"]),
        Route("/v1/tasks", admit, methods=["POST"]),
    ]
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=9000)
    args = ap.parse_args()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    uvicorn.Server(
        uvicorn.Config(app, loop="uvloop", http="httptools", access_log=False, log_level="warning")
    ).run(sockets=[sock])


if __name__ == "__main__":
    main()
