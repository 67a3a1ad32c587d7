"""The open probes (/healthz, /readyz, /version), the operator page's files and its admin live
feed, on a real orchd: no key where none is needed, a key everywhere else, and readiness that
follows drains and names each replica that cannot serve."""

from __future__ import annotations

import json
import platform
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import orchd
from tests.integration.conftest import run_task
from tests.support.daemon import Daemon
from tests.support.sse import Dechunker, _head, _request_bytes, sync_request
from tests.support.wait import wait_for

ADMIN, CLIENT = "admin-key-health", "client-key-health"
CONFIG = f"""
[server]
api_keys = ["{ADMIN}", {{key = "{CLIENT}", role = "client"}}]

[catalog]
model_roots = ["{{models}}"]

[[pools]]
id = "main"
model_ref = "mock:tiny"
[[pools]]
id = "spare"
model_ref = "mock:tiny"
[[pools]]
id = "broken"
model_ref = "file:/nonexistent/orchd-health-model.bin"

[[replicas]]
id = "m0"
pool_id = "main"
devices = "0"
[[replicas]]
id = "s0"
pool_id = "spare"
[[replicas]]
id = "x0"
pool_id = "broken"
model_ref = "file:/nonexistent/orchd-health-model.bin"
"""
GIT_SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def d(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    workdir = tmp_path_factory.mktemp("health")
    (workdir / "models").mkdir()
    env = {"ORCHD_NVML_MODULE": "tests.fakes.nvml", "ORCHD_GIT_SHA": GIT_SHA}
    config = CONFIG.replace("{models}", str(workdir / "models"))
    with Daemon(workdir, config, env=env, key=ADMIN) as daemon:
        yield daemon


def get(d: Daemon, path: str, key: str | None = None) -> tuple[int, dict[str, str], Any]:
    headers = {"X-API-Key": key} if key else {}
    status, hdrs, raw = sync_request(d.host, d.port, "GET", path, headers)
    ctype = hdrs.get("content-type", "")
    return status, hdrs, json.loads(raw) if ctype.startswith("application/json") else raw


def raw_get(d: Daemon, path: str) -> tuple[int, dict[str, str], bytes]:
    """A GET sent as written (no path normalized), for what the contract does not describe:
    the page's files, the redirect at /, a path that tries to climb out of /ui/."""
    with socket.create_connection((d.host, d.port), timeout=30) as s:
        s.sendall(_request_bytes("GET", path, d.host, d.port, {"Connection": "close"}, None))
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return _head(buf)


def post(d: Daemon, path: str, body: Any = None) -> int:
    status, _, _ = sync_request(d.host, d.port, "POST", path, {"X-API-Key": ADMIN}, body)
    return status


def test_healthz_answers_without_a_key(d: Daemon) -> None:
    status, _, body = get(d, "/healthz")
    assert status == 200
    assert body["status"] == "ok" and body["frontend"] == 0
    assert d.find("orchd.frontend.main").pid == body["pid"]


def test_everything_else_still_needs_a_key(d: Daemon) -> None:
    for path in ("/v1/capabilities", "/v1/pools/main/health", "/v1/admin/live"):
        assert get(d, path)[0] == 401, path
        assert get(d, path, "not-a-key")[0] == 403, path
    # The page's static files are open, but only as single names under /ui/.
    assert raw_get(d, "/ui/../v1/capabilities")[0] == 401
    assert raw_get(d, "/ui/%2e%2e/v1/capabilities")[0] == 401


def test_readyz_names_the_replica_that_cannot_serve(d: Daemon) -> None:
    wait_for(lambda: "x0" in _not_ready(d), 60, "the broken replica to report")
    status, _, body = get(d, "/readyz")
    assert status == 200 and body["ready"]
    assert body["replicas"] == 3 and body["ready_replicas"] == 2
    (broken,) = body["not_ready"]
    assert (broken["replica_id"], broken["pool_id"]) == ("x0", "broken")
    assert broken["state"] in ("failed", "down")
    assert "orchd-health-model.bin" in broken["reason"]


def _not_ready(d: Daemon) -> dict[str, dict[str, Any]]:
    return {r["replica_id"]: r for r in get(d, "/readyz")[2]["not_ready"]}


def test_readyz_follows_drain_and_undrain(d: Daemon) -> None:
    assert post(d, "/v1/pools/main/drain", {"deadline_ms": 0}) == 202
    try:
        status, _, body = get(d, "/readyz")
        assert status == 200  # the spare pool still serves
        assert _not_ready(d)["m0"]["reason"] == "pool main is draining"
        assert post(d, "/v1/pools/spare/drain", {"deadline_ms": 0}) == 202
        status, _, body = get(d, "/readyz")
        assert status == 503 and not body["ready"]
        assert body["reason"] == "no replica can serve a task"
        assert {r["replica_id"] for r in body["not_ready"]} == {"m0", "s0", "x0"}
    finally:
        assert post(d, "/v1/pools/main/undrain") == 200
        assert post(d, "/v1/pools/spare/undrain") == 200
    status, _, body = get(d, "/readyz")
    assert status == 200 and body["ready_replicas"] == 2
    run_task(d, max_tokens=2)  # and it serves again


def test_undrain_needs_an_admin_key(d: Daemon) -> None:
    status, _, _ = sync_request(
        d.host, d.port, "POST", "/v1/pools/main/undrain", {"X-API-Key": CLIENT}
    )
    assert status == 403
    assert post(d, "/v1/pools/nope/undrain") == 404


def test_version_says_what_runs(d: Daemon) -> None:
    status, _, body = get(d, "/version")
    assert status == 200
    assert body["version"] == orchd.__version__
    assert body["git_sha"] == GIT_SHA  # ORCHD_GIT_SHA, as an image build sets it
    assert body["python"] == platform.python_version()  # the tests run orchd's interpreter
    engines = {e["pool_id"]: e for e in body["engines"]}
    assert set(engines) == {"main", "spare", "broken"}
    assert engines["main"]["engine"] == "mock" and engines["main"]["engine_version"]


def test_the_page_loads_without_a_key_under_a_strict_policy(d: Daemon) -> None:
    for path, ctype in (
        ("/ui", "text/html"),
        ("/ui/", "text/html"),
        ("/ui/app.js", "text/javascript"),
        ("/ui/style.css", "text/css"),
    ):
        status, hdrs, raw = raw_get(d, path)
        assert status == 200 and hdrs["content-type"].startswith(ctype), path
        csp = hdrs["content-security-policy"]
        assert "default-src 'none'" in csp and "connect-src 'self'" in csp
        assert b"//cdn" not in raw and b"https://" not in raw  # nothing from elsewhere
    status, _, raw = raw_get(d, "/ui")
    assert b'src="/ui/app.js"' in raw and b'href="/ui/style.css"' in raw
    assert get(d, "/ui/missing.js")[0] == 404
    status, hdrs, _ = raw_get(d, "/")
    assert status == 307 and hdrs["location"] == "/ui"


def _live_frames(d: Daemon, key: str, n: int, timeout: float = 30.0) -> list[tuple[float, Any]]:
    """The first ``n`` events of the live feed as ``(arrived, (event, data))``."""
    frames: list[tuple[float, Any]] = []
    with socket.create_connection((d.host, d.port), timeout=timeout) as s:
        s.sendall(_request_bytes("GET", "/v1/admin/live", d.host, d.port, {"X-API-Key": key}, None))
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += s.recv(65536)
        status, hdrs, rest = _head(buf)
        assert status == 200 and hdrs["content-type"].startswith("text/event-stream")
        dechunk, text = Dechunker(), b""
        data = rest
        while len(frames) < n:
            text += dechunk.feed(data)
            *blocks, text = text.split(b"\n\n")
            for block in blocks:
                fields = dict(line.split(": ", 1) for line in block.decode().split("\n"))
                frames.append((time.monotonic(), (fields["event"], json.loads(fields["data"]))))
            if len(frames) < n:
                data = s.recv(65536)
                assert data, "the feed ended"
    return frames[:n]


def test_live_feed_is_admin_only_and_ticks_each_second(d: Daemon) -> None:
    status, _, body = get(d, "/v1/admin/live", CLIENT)
    assert status == 403 and "admin" in body["message"]
    run_task(d, max_tokens=5)
    frames = _live_frames(d, ADMIN, 3)
    assert [kind for _, (kind, _) in frames] == ["live"] * 3
    gaps = [b[0] - a[0] for a, b in zip(frames, frames[1:], strict=False)]
    assert all(0.5 < g < 5.0 for g in gaps), gaps
    first, second = frames[0][1][1], frames[1][1][1]
    assert second["at_ms"] > first["at_ms"]
    pools = {pl["id"]: pl for pl in first["pools"]}
    assert pools["main"]["replicas"][0]["id"] == "m0"
    assert first["recent"] and first["recent"][0]["outcome"] == "length"
    # Two fake GPUs; the first frame has their history, later ones the latest reading.
    assert [g["index"] for g in first["gpus"]] == [0, 1]
    assert first["gpus"][0]["replica_id"] == "m0" and first["gpus"][1]["replica_id"] == ""
    assert first["gpus"][0]["history"]["utilization"]
    assert "history" not in second["gpus"][0]
    assert 0 <= second["gpus"][0]["utilization"] <= 1


def test_an_open_live_feed_ends_when_orchd_stops(tmp_path: Path) -> None:
    """A page left open does not hold up a shutdown: the feed's last snapshot says orchd is
    shutting down, the stream ends, and orchd exits 0."""
    d = Daemon(tmp_path, "").start()
    try:
        with socket.create_connection((d.host, d.port), timeout=60) as s:
            s.sendall(_request_bytes("GET", "/v1/admin/live", d.host, d.port, d.headers, None))
            buf = b""
            while b"event: live" not in buf:
                buf += s.recv(65536)
            started = time.monotonic()
            codes: list[int] = []
            stopper = threading.Thread(target=lambda: codes.append(d.stop()))
            stopper.start()
            while chunk := s.recv(65536):
                buf += chunk
            ended = time.monotonic() - started
        stopper.join(60)
        assert codes == [0]
        assert buf.endswith(b"0\r\n\r\n")  # the chunked stream was ended, not cut
        last = [line for line in buf.split(b"\n") if line.startswith(b"data: ")][-1]
        assert json.loads(last[6:])["admitting"] is False
        assert ended < 15, ended
    finally:
        d.kill_tree()
