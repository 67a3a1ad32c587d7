"""The contracts themselves: OpenAPI documents that validate, every example in them valid
against its schema and replayed against a live orchd in its default configuration, an API
version that matches, live /metrics linted against contracts/metrics.lint.json, and a
schemathesis fuzz run against the running daemon that finds no 5xx and no response outside
the contract. (Every response any integration test receives is checked against the
documents too: tests/support/sse.py.)"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jsonschema
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import run_task
from tests.support import contract
from tests.support.daemon import Daemon
from tests.support.sse import Dechunker, SyncStream, _head, _request_bytes, sync_request

ROOT = Path(__file__).resolve().parents[2]


def test_openapi_documents_are_valid() -> None:
    for name in (*contract.FILES, "openai.yaml"):
        validate(contract._doc(name), base_uri=(contract.ROOT / name).as_uri())


def test_every_example_is_valid_against_its_schema() -> None:
    found = contract.examples()
    where = {f"{doc}{w}" for doc, w, _, _ in found}
    # The request bodies, path parameters and the error envelope all have theirs.
    assert len(found) >= 14, sorted(where)
    for doc, w, schema, example in found:
        err = jsonschema.exceptions.best_match(
            jsonschema.Draft202012Validator(schema).iter_errors(example)
        )
        assert err is None, f"{doc}{w}: example {example!r}: {err.message if err else ''}"


# Each operation of the documents, in an order where every request finds what it names.
REPLAY_ORDER = [
    "capabilities", "listPools", "poolHealth",
    "submitTask", "getTask", "streamTask", "cancelTask", "getSession",
    "putArtifact", "listArtifacts", "getArtifact", "deleteSession",
    "createModel", "listModels", "getModel", "verifyModel", "setModelState", "deleteModel",
    "drainPool", "undrainPool", "reloadPool", "metrics",
    "healthz", "readyz", "version", "adminLive",
]  # fmt: skip


def test_every_example_replays_against_a_live_orchd(tmp_path: Path) -> None:
    """Built from the documents' examples alone, each request gets its first documented 2xx
    from orchd's default configuration (no config file), and every answer conforms
    (sync_request and SyncStream check each against the documents)."""
    plan = contract.replays()
    assert sorted(plan) == sorted(REPLAY_ORDER), "a new operation needs its place here"
    with Daemon(tmp_path, "") as d:
        for op_id in REPLAY_ORDER:
            r = plan[op_id]
            headers = {} if r.path == "/metrics" else d.headers
            if op_id == "adminLive":  # endless: its head and first event
                assert first_live_event(d, r.path, headers) == (r.status, "live")
                continue
            if op_id == "streamTask":
                s = SyncStream(d.host, d.port, r.path, headers)
                events = s.read_to_end()
                s.close()
                assert (s.status, events[0].event, events[-1].event) == (r.status, "started", "end")
                continue
            status, _, raw = sync_request(d.host, d.port, r.method, r.path, headers, r.body)
            assert status == r.status, (op_id, r.method, r.path, status, raw[:300])
            if op_id == "putArtifact":
                # Content-addressed: the documented id of the example is the one it gets.
                assert json.loads(raw)["id"] == plan["getArtifact"].path.rsplit("/", 1)[1]
            if op_id == "listArtifacts":
                assert [a["tags"] for a in json.loads(raw)["artifacts"]] == [["sprint-7"]]


def first_live_event(d: Daemon, path: str, headers: dict[str, str]) -> tuple[int, str]:
    """The status of the operator page's live feed and the name of its first event."""
    with socket.create_connection((d.host, d.port), timeout=30) as sock:
        sock.sendall(_request_bytes("GET", path, d.host, d.port, headers, None))
        buf = b""
        while b"\n\n\r\n" not in buf.partition(b"\r\n\r\n")[2]:  # a whole first chunk
            chunk = sock.recv(65536)
            assert chunk, buf
            buf += chunk
    status, hdrs, rest = _head(buf)
    contract.check_response("GET", path, status, hdrs, b"")
    return status, Dechunker().feed(rest).split(b"\n", 1)[0].decode().removeprefix("event: ")


def test_api_version_matches_openapi(daemon: Daemon) -> None:
    status, _, raw = sync_request(
        daemon.host, daemon.port, "GET", "/v1/capabilities", daemon.headers
    )
    assert status == 200
    assert json.loads(raw)["api_version"] == contract.api_version()
    assert contract._doc("control.yaml")["info"]["version"] == contract.api_version()


def test_live_metrics_match_the_lint_file(daemon: Daemon) -> None:
    run_task(daemon, max_tokens=3)  # so that histograms and counters have samples
    status, _, raw = sync_request(daemon.host, daemon.port, "GET", "/metrics", {})
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(raw.decode())}
    lint = json.loads((ROOT / "contracts" / "metrics.lint.json").read_text())
    for m in lint["metrics"]:
        base = m["name"].removesuffix("_total") if m["type"] == "counter" else m["name"]
        fam = families.get(base)
        if fam is None:
            assert not m["required"], f"{m['name']} is missing from /metrics"
            continue
        assert fam.type == m["type"], (m["name"], fam.type)
        for sample in fam.samples:
            labels = set(sample.labels) - {"le"}
            assert labels == set(m["labels"]), (m["name"], sample.labels)


def test_fuzz_finds_no_5xx_and_nothing_outside_the_contract(daemon: Daemon, tmp_path: Path) -> None:
    env = {**os.environ, "SCHEMATHESIS_HOOKS": ""}
    st = [sys.executable, "-m", "schemathesis.cli"]
    base = f"http://{daemon.host}:{daemon.port}"
    for name in contract.FILES:
        r = subprocess.run(
            [
                *st, "run", str(contract.ROOT / name), "--url", base,
                "-H", f"X-API-Key: {daemon.key}",
                "--checks", "not_a_server_error,status_code_conformance,"
                "content_type_conformance,response_schema_conformance,"
                "response_headers_conformance",
                "--max-examples", "15", "--seed", "7", "--workers", "1",
                "--request-timeout", "20", "--max-time", "45",
                "--exclude-path", "/v1/tasks/{task_id}/stream",
                "--exclude-path", "/v1/admin/live",  # endless by design (test_health_endpoints)
                "--generation-codec", "ascii",
                "--phases", "examples,coverage,fuzzing",
                "--report", "junit", "--report-dir", str(tmp_path),
            ],
            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
        )  # fmt: skip
        out = r.stdout + r.stderr
        assert r.returncode == 0, f"schemathesis found problems in {name}:\n{out[-6000:]}"
        assert "passed" in out.lower()
