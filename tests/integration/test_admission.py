"""Validation at the door: typed errors that name the field, limits that are explicit."""

from __future__ import annotations

import json
import socket

import pytest

from tests.integration.conftest import submit
from tests.support.daemon import Daemon
from tests.support.sse import sync_request


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 10**9}, "max_tokens"),
        ({"ctx": "big"}, "ctx"),
        ({"priority": "urgent"}, "priority"),
        ({"engine": "gpt"}, "engine"),
        ({"workload": "chat"}, "workload"),
        ({"task_id": ""}, "task_id"),
        ({"seed": -1}, "seed"),
        ({"temperature": 2.5}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_fields_are_named(daemon: Daemon, over: dict, field: str) -> None:
    status, body, _ = submit(daemon, **over)
    assert status == 400
    assert body["code"] == "INVALID_PARAMS"
    assert field in body["message"]
    assert body["retriable"] is False


def test_missing_field_is_named(daemon: Daemon) -> None:
    status, _, raw = sync_request(
        daemon.host, daemon.port, "POST", "/v1/tasks", daemon.headers, {"task_id": "t-1"}
    )
    assert status == 400
    assert "session_id" in json.loads(raw)["message"]


def test_engine_no_pool_serves_is_refused(daemon: Daemon) -> None:
    status, body, _ = submit(daemon, engine="vllm")
    assert status == 400
    assert body["code"] == "INVALID_PARAMS"
    assert "vllm" in body["message"]


def test_bad_json_and_oversized_bodies(daemon: Daemon) -> None:
    status, _, raw = sync_request(
        daemon.host, daemon.port, "POST", "/v1/tasks", daemon.headers, b"{not json"
    )
    assert status == 400 and json.loads(raw)["code"] == "INVALID_PARAMS"
    # A body declared larger than limits.max_body_bytes is refused before it is read.
    with socket.create_connection((daemon.host, daemon.port), timeout=10) as s:
        s.sendall(
            b"POST /v1/tasks HTTP/1.1\r\nHost: x\r\nX-API-Key: dev\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n{" % (2 << 20)
        )
        reply = b""
        while not reply.endswith(b"}"):
            chunk = s.recv(65536)
            assert chunk, reply
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert json.loads(body)["code"] == "PAYLOAD_TOO_LARGE"


def test_duplicate_task_id_is_refused(daemon: Daemon) -> None:
    status, body, _ = submit(daemon, task_id="t-dup-1", max_tokens=2)
    assert status == 202
    status, body, _ = submit(daemon, task_id="t-dup-1", max_tokens=2)
    assert status == 400 and "already exists" in body["message"]


def test_capabilities(daemon: Daemon) -> None:
    status, _, raw = sync_request(
        daemon.host, daemon.port, "GET", "/v1/capabilities", daemon.headers
    )
    assert status == 200
    caps = json.loads(raw)
    assert caps["api_version"]
    (mock,) = caps["engines"]
    assert mock["engine"] == "mock" and mock["concurrency"] == 256
    assert {"engine_version", "ctx_max", "max_tokens_out", "supported_workloads"} <= set(mock)


def test_replicasets_is_never_served(daemon: Daemon) -> None:
    status, _, raw = sync_request(
        daemon.host, daemon.port, "GET", "/v1/replicasets", daemon.headers
    )
    assert status == 404
    assert json.loads(raw)["code"] == "NOT_FOUND"
