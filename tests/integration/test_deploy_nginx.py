"""deploy/nginx/orchd.conf in a real nginx: TLS + HTTP/2 to the client, SSE unbuffered.

The mock engine spaces its tokens ITL_MS apart, so a stream lasts about
MAX_TOKENS * ITL_MS; through an unbuffered proxy the first token reaches the client at the
start of that span, through a buffering one only at its end (the control case proves the
measurement tells the two apart)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.daemon import Daemon
from tests.support.nginx import SHIPPED, Nginx
from tests.support.tasks import task_body
from tests.support.wait import wait_for

CURL = "/usr/bin/curl"  # built with nghttp2 (Debian's curl): --http2
ITL_MS = 150
MAX_TOKENS = 12
SPAN_S = (MAX_TOKENS - 1) * ITL_MS / 1000  # first token to last token, as produced
GRACE_MS = 300  # a client gone this long, not resumed, has its task canceled
CONFIG = f"""
[limits]
resume_grace_ms = {GRACE_MS}

[[replicas]]
id = "r0"
slots = 8
[replicas.mock]
ttft_ms = 5
itl_ms = {ITL_MS}
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("orchd"), CONFIG) as d:
        yield d


def curl(*args: str) -> list[str]:
    return [CURL, "--http2", "-k", "-sS", "--max-time", "30", *args]


def submit(d: Daemon, base: str) -> str:
    """POST a task through the proxy over HTTP/2; its id."""
    body = task_body(max_tokens=MAX_TOKENS)
    r = subprocess.run(
        curl("-X", "POST", f"{base}/v1/tasks", "-H", f"X-API-Key: {d.key}",
             "-H", "Content-Type: application/json", "--data-binary", json.dumps(body),
             "-w", "\n%{http_code} %{http_version}"),
        capture_output=True, text=True, timeout=40, check=True,
    )  # fmt: skip
    answer, _, status = r.stdout.rpartition("\n")
    assert status == "202 2", (status, answer)
    return str(body["task_id"])


def stream_times(d: Daemon, base: str, task_id: str) -> tuple[list[float], float, str]:
    """Stream a task through the proxy with curl -N: each token event's arrival time, the
    end event's, and the HTTP version curl spoke."""
    tokens: list[float] = []
    end = version = None
    with subprocess.Popen(
        curl("-N", "--compressed", "-H", f"X-API-Key: {d.key}",
             "-w", "\n:version %{http_version}\n", f"{base}/v1/tasks/{task_id}/stream"),
        stdout=subprocess.PIPE,
    ) as proc:  # fmt: skip
        assert proc.stdout is not None
        for raw in proc.stdout:  # each line as soon as curl has it (-N: curl does not buffer)
            now = time.monotonic()
            line = raw.decode().rstrip("\n")
            if line == "event: token":
                tokens.append(now)
            elif line == "event: end":
                end = now
            elif line.startswith(":version "):
                version = line.split()[1]
        assert proc.wait(40) == 0
    assert end is not None and version is not None
    return tokens, end, version


def test_stream_through_nginx_http2_arrives_token_by_token(daemon: Daemon, tmp_path: Path) -> None:
    with Nginx(tmp_path, daemon.port) as nginx:
        base = f"https://127.0.0.1:{nginx.https_port}"
        tokens, end, version = stream_times(daemon, base, submit(daemon, base))
        assert version == "2"
        assert len(tokens) == MAX_TOKENS
        # Unbuffered: the first token was at the client while the engine still had most of
        # the stream to produce (a buffering proxy delivers it within a few ms of the end).
        assert end - tokens[0] > 0.6 * SPAN_S, (end - tokens[0], SPAN_S)
        # ... and so was every later one, spaced as produced, not in bursts.
        gaps = [b - a for a, b in zip(tokens, tokens[1:], strict=False)]
        assert sum(g > ITL_MS / 1000 / 3 for g in gaps) >= len(gaps) // 2, gaps

        # The other server blocks of the shipped file.
        r = subprocess.run(
            curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/metrics"),
            capture_output=True, text=True, timeout=40,
        )  # fmt: skip
        assert r.stdout == "404"  # Prometheus scrapes orchd directly, not through the proxy
        r = subprocess.run(
            [CURL, "-sS", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
             f"http://127.0.0.1:{nginx.http_port}/v1/capabilities"],
            capture_output=True, text=True, timeout=40,
        )  # fmt: skip
        assert r.stdout.startswith("301 https://127.0.0.1"), r.stdout


def canceled(d: Daemon) -> float:
    text = httpx.get(f"{d.base}/metrics", timeout=10).text
    return sum(
        float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("tasks_canceled_total{")
    )


def test_a_client_leaving_through_nginx_cancels_its_task(daemon: Daemon, tmp_path: Path) -> None:
    """An HTTP/2 client that goes away mid-stream: nginx closes its upstream connection and
    orchd cancels the task once its resume grace has passed (the engine stops generating for
    nobody)."""
    with Nginx(tmp_path, daemon.port) as nginx:
        base = f"https://127.0.0.1:{nginx.https_port}"
        body = task_body(max_tokens=300)  # 45 s at ITL_MS: it ends this soon only if canceled
        r = httpx.post(f"{daemon.base}/v1/tasks", json=body, headers=daemon.headers, timeout=10)
        assert r.status_code == 202, r.text
        before = canceled(daemon)
        with subprocess.Popen(
            curl("-N", "-H", f"X-API-Key: {daemon.key}",
                 f"{base}/v1/tasks/{body['task_id']}/stream"),
            stdout=subprocess.PIPE,
        ) as proc:  # fmt: skip
            assert proc.stdout is not None
            for raw in proc.stdout:
                if raw.startswith(b"event: token"):
                    break
            proc.kill()  # gone without a goodbye: the TCP connection to nginx closes
        wait_for(lambda: canceled(daemon) == before + 1, 10, "orchd to cancel the task")


def test_control_a_buffering_proxy_is_caught(daemon: Daemon, tmp_path: Path) -> None:
    """The same measurement through the shipped file turned into a buffering proxy: buffering
    on, orchd's `X-Accel-Buffering: no` ignored, and gzip on for SSE (buffered responses are
    compressed in whole buffers; measured: with buffering on but no gzip, nginx 1.22 still
    forwards each read at once). The tokens then arrive in one burst at the end, so the
    assertion above is one a buffering proxy fails."""
    site = SHIPPED.read_text()
    for old, new in (
        ("proxy_buffering off;", "proxy_buffering on; proxy_ignore_headers X-Accel-Buffering;"),
        ("gzip off;", "gzip on; gzip_types text/event-stream;"),
    ):
        assert site.count(old) == 1
        site = site.replace(old, new)
    with Nginx(tmp_path, daemon.port, site=site) as nginx:
        base = f"https://127.0.0.1:{nginx.https_port}"
        tokens, end, _ = stream_times(daemon, base, submit(daemon, base))
        assert len(tokens) == MAX_TOKENS
        assert end - tokens[0] < 0.2 * SPAN_S, (end - tokens[0], SPAN_S)
