from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.daemon import Daemon
from tests.support.sse import SyncStream, sync_request
from tests.support.tasks import task_body

FAST = """
[limits]
queue_capacity = 4096

[[replicas]]
id = "r0"
slots = 128
[replicas.mock]
ttft_ms = 2
itl_ms = 1

[[replicas]]
id = "r1"
slots = 128
[replicas.mock]
ttft_ms = 2
itl_ms = 1
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("orchd"), FAST) as d:
        yield d


def submit(d: Daemon, **over: Any) -> tuple[int, dict[str, Any], dict[str, str]]:
    body = task_body(**over)
    status, headers, raw = sync_request(d.host, d.port, "POST", "/v1/tasks", d.headers, body)
    return status, json.loads(raw) if raw else {}, headers


def stream(d: Daemon, task_id: str, headers: dict[str, str] | None = None) -> SyncStream:
    return SyncStream(d.host, d.port, f"/v1/tasks/{task_id}/stream", headers or d.headers)


def cancel(d: Daemon, task_id: str) -> int:
    status, _, _ = sync_request(d.host, d.port, "POST", f"/v1/tasks/{task_id}/cancel", d.headers)
    return status


def run_task(d: Daemon, **over: Any) -> SyncStream:
    status, body, _ = submit(d, **over)
    assert status == 202, body
    s = stream(d, body["task_id"])
    assert s.status == 200, s.body
    s.read_to_end()
    s.close()
    return s


def metric(d: Daemon, name: str, labels: str = "") -> float:
    """The sum of ``name``'s samples whose labels include ``labels`` (``'{k="v",...}'``)."""
    status, _, raw = sync_request(d.host, d.port, "GET", "/metrics", {})
    assert status == 200
    want = set(re.findall(r'(\w+)="([^"]*)"', labels))  # plain values: no quotes inside
    total = 0.0
    for fam in text_string_to_metric_families(raw.decode()):
        for sample in fam.samples:
            if sample.name == name and want <= set(sample.labels.items()):
                total += sample.value
    return total
