"""API keys and correlation ids, on every kind of response."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import stream, submit
from tests.support.daemon import Daemon
from tests.support.sse import SyncStream, sync_request
from tests.support.tasks import task_body


def test_missing_key_is_401_with_envelope_and_correlation_id(daemon: Daemon) -> None:
    status, headers, raw = sync_request(
        daemon.host, daemon.port, "POST", "/v1/tasks", {}, task_body()
    )
    assert status == 401
    assert json.loads(raw)["code"] == "UNAUTHORIZED"
    assert re.fullmatch(r"[0-9a-f]{32}", headers["x-correlation-id"])


def test_wrong_key_is_403_and_echoes_correlation_id(daemon: Daemon) -> None:
    status, headers, raw = sync_request(
        daemon.host, daemon.port, "GET", "/v1/capabilities",
        {"X-API-Key": "nope", "X-Correlation-Id": "cid-403"},
    )  # fmt: skip
    assert status == 403
    assert json.loads(raw)["code"] == "FORBIDDEN"
    assert headers["x-correlation-id"] == "cid-403"


def test_bearer_key_and_correlation_echo_on_202_and_sse(daemon: Daemon) -> None:
    hdrs = {"Authorization": "Bearer dev", "X-Correlation-Id": "cid-abc"}
    status, headers, raw = sync_request(
        daemon.host, daemon.port, "POST", "/v1/tasks", hdrs, task_body()
    )
    assert status == 202 and headers["x-correlation-id"] == "cid-abc"
    tid = json.loads(raw)["task_id"]
    s = SyncStream(daemon.host, daemon.port, f"/v1/tasks/{tid}/stream", hdrs)
    assert s.status == 200 and s.headers["x-correlation-id"] == "cid-abc"
    assert s.read_to_end()[-1].event == "end"


def test_stream_without_key_is_refused(daemon: Daemon) -> None:
    _, body, _ = submit(daemon, max_tokens=2)
    s = stream(daemon, body["task_id"], headers={"X-Correlation-Id": "cid-sse"})
    s.read_until(lambda st: b"}" in st.body, 5)
    assert s.status == 401 and s.headers["x-correlation-id"] == "cid-sse"


def test_metrics_needs_no_key(daemon: Daemon) -> None:
    status, headers, raw = sync_request(daemon.host, daemon.port, "GET", "/metrics", {})
    assert status == 200
    assert headers["x-correlation-id"]
    text = raw.decode()
    for name in ("tasks_enqueued_total", "tasks_started_total", "tokens_out_total", "queue_depth"):
        assert name in text


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(
        Path(tmp_path_factory.mktemp("keyed")),
        "",
        env={"ORCHD_API_KEYS": "k-one, k-two"},
        key="k-two",
    ).start()
    try:
        yield d
    finally:
        assert d.stop() == 0


def test_configured_keys_replace_dev(keyed: Daemon) -> None:
    status, _, _ = sync_request(
        keyed.host, keyed.port, "GET", "/v1/capabilities", {"X-API-Key": "dev"}
    )
    assert status == 403
    for key in ("k-one", "k-two"):
        status, _, _ = sync_request(
            keyed.host, keyed.port, "GET", "/v1/capabilities", {"X-API-Key": key}
        )
        assert status == 200
    assert keyed.count_log(lambda r: "development key" in r.get("narration", "")) == 0
