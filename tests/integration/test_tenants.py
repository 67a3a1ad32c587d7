"""Tenants isolated by key, roles for the control plane, confined model paths, bad JSON
shapes (issue 13), through a daemon with two client keys and an admin key."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from orchd.keys import key_id
from tests.support.daemon import Daemon
from tests.support.sse import SyncStream, sync_request
from tests.support.tasks import task_body
from tests.support.wait import wait_for

A, B, ADMIN = "key-a", "key-b", "key-admin"
CONFIG = """
[server]
api_keys = [
  {{key = "{a}", role = "client"}},
  {{key = "{b}", role = "client", max_streams = 2}},
  "{admin}",
]

[limits]
queue_capacity = 256

[catalog]
model_roots = ["{root}"]
verify_max_bytes = 4096

[[replicas]]
id = "r0"
slots = 64
[replicas.mock]
ttft_ms = 2
itl_ms = 2
"""


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return Path(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, roots: Path) -> Iterator[Daemon]:
    cfg = CONFIG.format(a=A, b=B, admin=ADMIN, root=roots)
    with Daemon(Path(tmp_path_factory.mktemp("tenants")), cfg, key=A) as d:
        yield d


def call(
    d: Daemon, key: str, method: str, path: str, body: Any = None
) -> tuple[int, dict[str, str], Any]:
    status, headers, raw = sync_request(d.host, d.port, method, path, {"X-API-Key": key}, body)
    return status, headers, json.loads(raw) if raw else None


def submit(d: Daemon, key: str, **over: Any) -> tuple[int, Any]:
    status, _, body = call(d, key, "POST", "/v1/tasks", task_body(**over))
    return status, body


def open_stream(d: Daemon, key: str, task_id: str, query: str = "") -> SyncStream:
    return SyncStream(d.host, d.port, f"/v1/tasks/{task_id}/stream{query}", {"X-API-Key": key})


def test_a_tenants_task_is_invisible_to_another_key_on_every_route(two: Daemon) -> None:
    long = {"task_id": "t-0", "session_id": "s-0", "max_tokens": 20_000, "deadline_ms": 600_000}
    assert submit(two, A, **long)[0] == 202
    # B names A's task and session: not found, exactly as an id nobody used.
    for method, path in [
        ("POST", "/v1/tasks/t-0/cancel"),
        ("GET", "/v1/sessions/s-0"),
        ("DELETE", "/v1/sessions/s-0"),
    ]:
        status, _, body = call(two, B, method, path)
        assert status == 404 and body["code"] == "NOT_FOUND", (method, path, body)
        assert key_id(A) not in body["message"]
        unused = path.replace("t-0", "t-unused").replace("s-0", "s-unused")
        assert call(two, B, method, unused)[2]["message"] == body["message"].replace(
            "t-0", "t-unused"
        ).replace("s-0", "s-unused")
    s = open_stream(two, B, "t-0")
    assert s.status == 404 and json.loads(s.body)["code"] == "NOT_FOUND"
    s.close()
    # B may use the same ids: they are B's own.
    status, body = submit(two, B, task_id="t-0", session_id="s-0", max_tokens=5)
    assert status == 202 and body["task_id"] == "t-0"
    mine = open_stream(two, B, "t-0")
    events = mine.read_to_end()
    mine.close()
    assert [e.event for e in events][-1] == "end" and events[-1].json["tokens_out"] == 5
    status, _, sess = call(two, B, "GET", "/v1/sessions/s-0")
    assert status == 200 and sess["session_id"] == "s-0" and sess["turns"] == 1
    # A's task ran on, untouched: A streams it and cancels it.
    theirs = open_stream(two, A, "t-0")
    theirs.read_until(lambda st: any(e.event == "token" for e in st.events))
    assert call(two, A, "POST", "/v1/tasks/t-0/cancel")[0] == 204
    theirs.read_to_end()
    theirs.close()
    assert theirs.events[-1].event == "end" and theirs.events[-1].json["reason"] == "canceled"


def test_transcripts_and_artifacts_are_their_owners(two: Daemon) -> None:
    assert submit(two, A, task_id="t-tr", session_id="s-tr", max_tokens=4)[0] == 202
    s = open_stream(two, A, "t-tr")
    aid = s.read_to_end()[-1].json["artifact_id"]
    s.close()
    path = f"/v1/artifacts/{aid}"
    status, _, art = call(two, A, "GET", path)
    assert status == 200 and art["kind"] == "trace"
    for key in (B, ADMIN):  # nobody else, not even an admin without tenant=
        status, _, body = call(two, key, "GET", path)
        assert status == 404 and body["code"] == "NOT_FOUND"
    # An admin reads it for support by naming the tenant; a client may not.
    assert call(two, ADMIN, "GET", f"{path}?tenant={key_id(A)}")[0] == 200
    assert call(two, B, "GET", f"{path}?tenant={key_id(A)}")[0] == 403
    # Artifacts put by A: not B's, until B puts the same content (content-addressed).
    doc = {"kind": "other", "content": {"secret": "a's"}}
    status, _, put = call(two, A, "POST", "/v1/artifacts", doc)
    assert status == 201
    assert call(two, B, "GET", f"/v1/artifacts/{put['id']}")[0] == 404
    assert call(two, B, "POST", "/v1/artifacts", doc)[2]["id"] == put["id"]
    assert call(two, B, "GET", f"/v1/artifacts/{put['id']}")[0] == 200


def test_an_admin_reaches_a_tenants_task_with_tenant(two: Daemon) -> None:
    long = {"task_id": "t-sup", "session_id": "s-sup", "max_tokens": 20_000}
    assert submit(two, A, **long, deadline_ms=600_000)[0] == 202
    q = f"?tenant={key_id(A)}"
    assert call(two, ADMIN, "POST", "/v1/tasks/t-sup/cancel")[0] == 404  # its own: none
    status, _, body = call(two, B, "POST", f"/v1/tasks/t-sup/cancel{q}")
    assert status == 403 and body["code"] == "FORBIDDEN"
    assert call(two, ADMIN, "GET", f"/v1/sessions/s-sup{q}")[2]["session_id"] == "s-sup"
    assert call(two, ADMIN, "POST", f"/v1/tasks/t-sup/cancel{q}")[0] == 204
    s = open_stream(two, ADMIN, "t-sup", q)
    assert s.read_to_end()[-1].json["reason"] == "canceled"
    s.close()
    assert call(two, ADMIN, "GET", "/v1/sessions/s-sup?tenant=not-hex")[0] == 400


def test_client_keys_get_403_on_the_control_plane(two: Daemon, roots: Path) -> None:
    (roots / "m.bin").write_bytes(b"weights")
    control = [
        ("GET", "/v1/pools/default/health", None),
        ("POST", "/v1/pools/default/drain", {"deadline_ms": 1000}),
        ("POST", "/v1/pools/default/reload", {"new_model_ref": "mock:tiny"}),
        ("POST", "/v1/catalog/models", {"id": "m", "ref": f"file:{roots / 'm.bin'}"}),
        ("POST", "/v1/catalog/models/m/verify", None),
        ("POST", "/v1/catalog/models/m/state", {"state": "Retired"}),
        ("DELETE", "/v1/catalog/models/m", None),
    ]
    for method, path, body in control:
        status, headers, err = call(two, A, method, path, body)
        assert status == 403 and err["code"] == "FORBIDDEN", (method, path)
        assert "admin" in err["message"] and headers["x-correlation-id"]
    # The data plane and reading the catalog stay open to clients.
    assert call(two, A, "GET", "/v1/capabilities")[0] == 200
    assert call(two, ADMIN, "GET", "/v1/pools/default/health")[0] == 200
    assert call(two, ADMIN, *control[3])[0] == 201
    assert call(two, A, "GET", "/v1/catalog/models/m")[0] == 200


def test_a_key_holds_at_most_its_stream_cap(two: Daemon) -> None:
    for i in range(3):
        assert submit(two, B, task_id=f"cap-{i}", max_tokens=20_000, deadline_ms=600_000)[0] == 202
    held = [open_stream(two, B, f"cap-{i}") for i in range(2)]
    assert all(s.status == 200 for s in held)
    third = open_stream(two, B, "cap-2")
    err = json.loads(third.body)
    assert third.status == 429 and err["code"] == "ADMISSION_REJECT"
    assert "2 streams" in err["message"] and third.headers["retry-after"]
    third.close()
    assert open_stream(two, A, "t-missing").status == 404  # other keys are not held back
    for i, s in enumerate(held):
        call(two, B, "POST", f"/v1/tasks/cap-{i}/cancel")
        s.read_to_end()
        s.close()

    def freed() -> bool:
        s = open_stream(two, B, "cap-2")
        try:
            return s.status == 200
        finally:
            s.close()

    wait_for(freed, 10, "a stream of key B to be free again")
    call(two, B, "POST", "/v1/tasks/cap-2/cancel")


def test_file_refs_stay_under_the_model_roots(two: Daemon, roots: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"not a model")
    (roots / "escape").unlink(missing_ok=True)
    (roots / "escape").symlink_to(outside)
    fifo = roots / "fifo"
    if not fifo.exists():
        os.mkfifo(fifo)
    for i, ref in enumerate(
        [
            "file:/etc/passwd",
            "file:/dev/zero",
            "file:/proc/self/environ",
            f"file:{roots}/../{tmp_path.name}/secret.bin",
            f"file:{roots / 'escape'}",
            f"file:{fifo}",
        ]
    ):
        status, _, body = call(
            two, ADMIN, "POST", "/v1/catalog/models", {"id": f"x{i}", "ref": ref}
        )
        assert status == 400 and body["code"] == "INVALID_PARAMS", (ref, body)
        assert repr(ref) in body["message"], body  # the ref as given ...
        assert str(outside) not in body["message"]  # ... never where it leads
        status, _, body = call(
            two, ADMIN, "POST", "/v1/pools/default/reload", {"new_model_ref": ref}
        )
        assert status == 400 and repr(ref) in body["message"], (ref, body)


def test_verification_is_bounded_in_bytes(two: Daemon, roots: Path) -> None:
    big = roots / "big.bin"
    big.write_bytes(b"x" * 8192)  # verify_max_bytes = 4096
    ref = f"file:{big}"
    assert call(two, ADMIN, "POST", "/v1/catalog/models", {"id": "big", "ref": ref})[0] == 201
    assert call(two, ADMIN, "POST", "/v1/catalog/models/big/verify")[0] == 202

    def recorded() -> bool:
        return call(two, ADMIN, "GET", "/v1/catalog/models/big")[2].get("last_verified_ms") is not None

    wait_for(recorded, 10, "the verification to end")
    m = call(two, ADMIN, "GET", "/v1/catalog/models/big")[2]
    assert m.get("verified") is not True
    assert "verify_max_bytes" in json.dumps(m) and str(roots) not in json.dumps(m).replace(ref, "")


def deep(n: int) -> str:
    return "[" * n + "]" * n


@pytest.mark.parametrize(
    ("method", "path", "key", "body"),
    [
        ("POST", "/v1/artifacts", A, '{"kind": "note", "content": %s}'),
        ("POST", "/v1/tasks", A, '{"task_id": "d", "prompt": %s}'),
        ("POST", "/v1/pools/default/drain", ADMIN, '{"deadline_ms": %s}'),
        ("POST", "/v1/catalog/models", ADMIN, '{"id": %s}'),
    ],
)
def test_json_nested_past_the_limit_is_a_400_naming_it(
    two: Daemon, method: str, path: str, key: str, body: str
) -> None:
    for n in (65, 1000, 100_000):
        raw = (body % deep(n)).encode()
        status, _, err = call(two, key, method, path, raw)
        assert status == 400 and err["code"] == "INVALID_PARAMS", (n, err)
        assert "64" in err["message"]
    # At the limit it parses (and fails, or not, for what it says).
    status, _, err = call(two, key, method, path, (body % deep(63)).encode())
    assert status != 500 and "64" not in (err or {}).get("message", "")


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("DELETE", "/v1/tasks", "POST"),
        ("PUT", "/v1/sessions/s-0", "DELETE, GET, HEAD"),
        ("GET", "/v1/tasks/t-0/cancel", "POST"),
        ("POST", "/v1/capabilities", "GET, HEAD"),
    ],
)
def test_405_says_what_is_allowed(two: Daemon, method: str, path: str, allow: str) -> None:
    status, headers, _ = call(two, A, method, path)
    assert status == 405 and headers["allow"] == allow
