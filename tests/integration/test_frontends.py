"""Several frontend processes share the port; a stream may be opened on any of them."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator

import pytest

from tests.integration.test_streaming import check_stream
from tests.support.daemon import Daemon
from tests.support.sse import SyncStream, _request_bytes
from tests.support.tasks import task_body


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("pair"), "", frontends=2) as d:
        yield d


def submit_on(d: Daemon, frontend: str, body: dict) -> dict:
    """POST on a connection the kernel gave to ``frontend`` (new connections until it does)."""
    raw = json.dumps(body).encode()
    for _ in range(200):
        with socket.create_connection((d.host, d.port), timeout=10) as s:
            # An idempotent probe first: only submit once we know who answers.
            s.sendall(_request_bytes("GET", "/v1/capabilities", d.host, d.port, d.headers, None))
            head = s.recv(65536)
            if f"x-orchd-frontend: {frontend}".encode() not in head.lower():
                continue
            while b"}]}" not in head:
                head += s.recv(65536)
            s.sendall(_request_bytes("POST", "/v1/tasks", d.host, d.port, d.headers, raw))
            reply = b""
            while not reply.endswith(b"}"):
                reply += s.recv(65536)
            assert b" 202 " in reply.split(b"\r\n", 1)[0]
            return json.loads(reply.partition(b"\r\n\r\n")[2])
    raise AssertionError(f"never reached frontend {frontend}")


def test_submit_on_one_frontend_stream_on_the_other(pair: Daemon) -> None:
    seen = set()
    for _ in range(32):  # (all 32 on one frontend by chance: p = 2^-31)
        body = task_body(max_tokens=40)
        first = submit_on(pair, "0", body)
        # Which frontend serves the stream is up to the kernel: both must work.
        s = SyncStream(pair.host, pair.port, f"/v1/tasks/{first['task_id']}/stream", pair.headers)
        seen.add(s.headers["x-orchd-frontend"])
        check_stream(s.read_to_end(), 40)
        s.close()
        if seen == {"0", "1"}:
            break
    assert seen == {"0", "1"}, f"streams only ever reached frontends {seen}"
