"""GET /metrics of a real orchd (two frontends, two replicas, the fake NVML of
tests/fakes/nvml.py): every series of contracts/metrics.lint.json with exactly its labels,
``promtool check metrics`` finding fault only with the seed-mandated ``_ms`` names, one view
whichever frontend answers, and every orchd process's own figures."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine_procs.mock_engine import prompt_tokens
from tests.integration.conftest import run_task, submit
from tests.support.daemon import Daemon
from tests.support.sse import _request_bytes
from tests.support.wait import wait_for

PROMPT = "one two three four"
ROOT = Path(__file__).resolve().parents[2]
LINT = json.loads((ROOT / "contracts" / "metrics.lint.json").read_text())

CONFIG = """
[[replicas]]
id = "r0"
slots = 8
devices = "0"
[replicas.mock]
ttft_ms = 2
itl_ms = 5

[[replicas]]
id = "r1"
slots = 8
devices = "1"
[replicas.mock]
ttft_ms = 2
itl_ms = 5
"""

# Series with no sample until their event: nothing here catalogs, verifies, cancels, fills the
# queue or restarts an engine before the first test's scrape.
NOT_YET = {
    "model_state",
    "catalog_verifications_total",
    "tasks_canceled_total",
    "admission_backpressure_events_total",
    "orchd_engine_restarts_total",
}


@pytest.fixture(scope="module")
def orchd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    env = {"ORCHD_NVML_MODULE": "tests.fakes.nvml", "ORCHD_GIT_SHA": "0123abcd"}
    with Daemon(tmp_path_factory.mktemp("metrics"), CONFIG, frontends=2, env=env) as d:
        for _ in range(3):
            run_task(d, max_tokens=6, prompt=PROMPT)
        status, body, _ = submit(d, model_ref="mock:unserved")  # the scheduler refuses it
        assert status == 400, body
        yield d


def read_response(s: socket.socket) -> tuple[str, dict[str, str], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, "connection closed before the response head"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    size = int(headers.get("content-length", "0"))
    while len(body) < size:
        chunk = s.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return lines[0], headers, body


def scrape_on(d: Daemon, frontend: str) -> tuple[socket.socket, str]:
    """A keep-alive connection the kernel gave to ``frontend``, and the scrape it answered."""
    for _ in range(200):
        s = socket.create_connection((d.host, d.port), timeout=10)
        s.sendall(_request_bytes("GET", "/metrics", d.host, d.port, {}, None))
        status, headers, body = read_response(s)
        assert " 200 " in status + " ", status
        if headers["x-orchd-frontend"] == frontend:
            return s, body.decode()
        s.close()
    raise AssertionError(f"no connection reached frontend {frontend}")


def scrape(d: Daemon, frontend: str = "0") -> str:
    s, text = scrape_on(d, frontend)
    s.close()
    return text


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (x.name, frozenset(x.labels.items())): x.value
        for fam in text_string_to_metric_families(text)
        for x in fam.samples
    }


def test_every_lint_series_carries_exactly_its_labels(orchd: Daemon) -> None:
    families = {f.name: f for f in text_string_to_metric_families(scrape(orchd))}
    for m in LINT["metrics"]:
        base = m["name"].removesuffix("_total") if m["type"] == "counter" else m["name"]
        fam = families.get(base)
        # The fake NVML shows two GPUs, so the gpu series must be there too.
        assert fam is not None, f"{m['name']} is missing from /metrics"
        assert fam.type == m["type"], (m["name"], fam.type)
        assert fam.samples or m["name"] in NOT_YET, f"{m['name']} has no samples"
        for sample in fam.samples:
            labels = set(sample.labels) - {"le"}
            assert labels == set(m["labels"]), (m["name"], sample.labels)
    got = samples(scrape(orchd))
    where = dict(engine="mock", engine_version="mock-1.0", pool_id="default")
    assert got[("tasks_enqueued_total", frozenset({**where, "replica_id": "none",
                                                   "priority": "interactive"}.items()))] == 3  # fmt: skip
    # Prompt tokens are counted (they were always 0), as the engine counts them.
    tokens_in = sum(v for (n, _), v in got.items() if n == "tokens_in_total")
    assert tokens_in == 3 * prompt_tokens(PROMPT) > 0
    assert sum(v for (n, _), v in got.items() if n == "tokens_out_total") == 18
    rejected = {dict(ls)["engine"] for n, ls in got if n == "tasks_rejected_total"}
    assert rejected == {"mock"}
    refused = frozenset({"model": "mock:unserved", "pool": "none", "outcome": "rejected"}.items())
    assert got[("orchd_requests_total", refused)] == 1
    gpu = {dict(ls)["replica_id"] for n, ls in got if n == "gpu_utilization"}
    assert gpu == {"r0", "r1"}  # the fake's two devices, owned by the replicas naming them


def test_promtool_finds_fault_only_with_the_seed_ms_names(orchd: Daemon) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is needed (Debian: apt-get install prometheus)"
    text = scrape(orchd)
    r = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60
    )
    out = (r.stdout + r.stderr).decode()
    complaints = [line for line in out.splitlines() if line.strip()]
    named = {re.split(r"\s", line.strip(), maxsplit=1)[0] for line in complaints}
    seed_ms = {m["name"] for m in LINT["metrics"] if m.get("seed_unit") == "ms"}
    assert named == seed_ms, out  # it does complain about those, and about nothing else
    assert all("abbreviated units" in line for line in complaints), out


def test_every_scrape_shows_every_frontend(orchd: Daemon) -> None:
    # A client leaves a stream on frontend 1 mid-way: a disconnect counted there.
    status, body, _ = submit(orchd, max_tokens=4000)
    assert status == 202, body
    conn, _ = scrape_on(orchd, "1")
    path = f"/v1/tasks/{body['task_id']}/stream"
    conn.sendall(_request_bytes("GET", path, orchd.host, orchd.port, orchd.headers, None))
    got = b""
    while b"event:" not in got:  # the stream has begun (the socket times out after 10 s)
        chunk = conn.recv(65536)
        assert chunk, got
        got += chunk
    conn.close()
    key = ("frontend_client_disconnects_total", frozenset({("frontend", "1")}))

    def both_see_it() -> bool:
        return all(samples(scrape(orchd, fe)).get(key) == 1 for fe in ("0", "1"))

    wait_for(both_see_it, 30, "frontend 1's disconnect in scrapes through both frontends")
    for fe in ("0", "1"):
        got = samples(scrape(orchd, fe))
        for name in ("frontend_streams_open", "frontend_stream_overflows_total"):
            assert {dict(ls)["frontend"] for n, ls in got if n == name} == {"0", "1"}
        assert got[("frontend_client_disconnects_total", frozenset({("frontend", "0")}))] == 0


def test_every_orchd_process_reports_its_own_figures(orchd: Daemon) -> None:
    got = samples(scrape(orchd))
    roles = {
        "launcher": "launcher",
        "scheduler": "scheduler",
        "frontend-0": "frontend",
        "frontend-1": "frontend",
        "supervisor-r0": "supervisor",
        "supervisor-r1": "supervisor",
    }
    for instance, role in roles.items():
        ls = frozenset({"role": role, "instance": instance}.items())
        assert got[("orchd_process_cpu_seconds_total", ls)] > 0, instance
        assert got[("orchd_process_resident_memory_bytes", ls)] > 10 * 2**20, instance
        assert got[("orchd_process_open_fds", ls)] >= 3, instance
    assert {dict(ls)["instance"] for n, ls in got if n == "orchd_process_open_fds"} == set(roles)
    build = [dict(ls) for n, ls in got if n == "orchd_build_info"]
    assert len(build) == 1 and build[0]["git_sha"] == "0123abcd" and build[0]["version"]
    assert got[("orchd_replicas_ready", frozenset({("pool", "default")}))] == 2
    ok = frozenset({"model": "mock:tiny", "pool": "default", "outcome": "ok"}.items())
    assert got[("orchd_requests_total", ok)] >= 3
    native = frozenset({"model": "mock:tiny", "pool": "default"}.items())
    for h in ("orchd_time_to_first_token_seconds", "orchd_inter_token_seconds"):
        assert got[(f"{h}_count", native)] >= 3, h
