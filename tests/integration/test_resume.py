"""Resumable streams (issue 12, failure 5): a client whose connection drops, or whose
frontend is killed or paused, comes back with ``Last-Event-ID`` on any frontend and gets
exactly the rest of its stream: no gap, no repeat, one terminal. A disconnect cancels the task
only once ``limits.resume_grace_ms`` passed with no GET; a second concurrent GET without
``Last-Event-ID`` is 409. Real processes, sockets and rings throughout."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import httpx
import openai
import pytest

from tests.integration.conftest import submit
from tests.support.daemon import Daemon
from tests.support.sse import Dechunker, Event, SSEParser, SyncStream, _head, _request_bytes

GRACE_MS = 3000
ONE = f"""
[limits]
resume_grace_ms = {GRACE_MS}

[[replicas]]
id = "r0"
slots = 8
[replicas.mock]
ttft_ms = 1
itl_ms = 5
"""

PAIR = """
[server]
restart_backoff_ms = 100

[[replicas]]
id = "r0"
slots = 8
[replicas.mock]
ttft_ms = 1
itl_ms = 10
"""
PAUSE_S = 15.0  # past the scheduler's peer timeout (server.peer_timeout_ms, 10 s)

TERMINAL = ("end", "error")


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("resume1"), ONE) as d:
        yield d


@pytest.fixture(autouse=True)
def _close_raw() -> Iterator[None]:
    yield
    while Raw.opened:
        Raw.opened.pop().close()


class Raw:
    """An SSE GET on a connection that ``frontend`` serves (probed first on the same
    keep-alive connection), or on any frontend when ``frontend`` is None. Closed when its
    test ends, if not before."""

    opened: ClassVar[list[Raw]] = []

    def __init__(
        self, d: Daemon, path: str, frontend: str | None = None, last_id: int | None = None
    ) -> None:
        headers = dict(d.headers)
        if last_id is not None and last_id >= 0:
            headers["Last-Event-ID"] = str(last_id)
        for _ in range(200):
            self.sock = socket.create_connection((d.host, d.port), timeout=30)
            if frontend is None or self._probe(d) == frontend:
                break
            self.sock.close()
        else:
            raise AssertionError(f"never reached frontend {frontend}")
        Raw.opened.append(self)
        self.sock.sendall(_request_bytes("GET", path, d.host, d.port, headers, None))
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before headers")
            buf += chunk
        self.status, self.headers, rest = _head(buf)
        self.dechunk, self.sse = Dechunker(), SSEParser()
        self.events: list[Event] = []
        self.eof = False
        self.first_event_at = 0.0
        self._feed(rest)

    def _probe(self, d: Daemon) -> str:
        probe = _request_bytes("GET", "/v1/capabilities", d.host, d.port, d.headers, None)
        self.sock.sendall(probe)
        buf = b""
        while b"\r\n\r\n" not in buf:
            buf += self.sock.recv(65536)
        _, headers, rest = _head(buf)
        want = int(headers.get("content-length", "0"))
        while len(rest) < want:
            rest += self.sock.recv(65536)
        return headers["x-orchd-frontend"]

    def _feed(self, data: bytes) -> None:
        if self.status != 200:
            return
        new = self.sse.feed(self.dechunk.feed(data))
        if new and not self.events:
            self.first_event_at = time.monotonic()
        self.events += new
        self.eof = self.eof or self.dechunk.done

    def read_until(self, pred: Any, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not pred(self) and not self.eof:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                self.eof = True
                break
            self._feed(chunk)
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met; last events {self.events[-3:]}")

    def read_to_end(self, timeout: float = 30.0) -> list[Event]:
        self.read_until(lambda r: False, timeout)
        return self.events

    def close(self) -> None:
        self.sock.close()


def reconnect(d: Daemon, path: str, last_id: int, timeout: float = 10.0) -> Raw:
    """Reconnect as an SSE client does after a lost connection: again until one answers (a
    connection the kernel queued on a killed frontend's socket is reset)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return Raw(d, path, last_id=last_id)
        except ConnectionError:
            if time.monotonic() > deadline:
                raise


def ids(events: list[Event]) -> list[int]:
    return [int(e.id) for e in events if e.id is not None]


def tokens(events: list[Event]) -> int:
    return sum(1 for e in events if e.event == "token")


def check_rest(first: list[Event], rest: list[Event], max_tokens: int) -> None:
    """``rest`` continues ``first`` exactly: ids consecutive across the two, every token once,
    one terminal, and it is the task's own end (it ran on: not canceled)."""
    kept = [e for e in first if e.id is not None]  # (a frame about the connection has no id)
    assert kept, "the first connection got no event"
    assert ids(rest)[0] == ids(kept)[-1] + 1, (kept[-2:], rest[:2])
    whole = kept + rest
    assert ids(whole) == list(range(len(ids(whole)))), "a gap or a repeat"
    assert [e.json["i"] for e in whole if e.event == "token"] == list(range(max_tokens))
    assert sum(1 for e in whole if e.event in TERMINAL) == 1
    assert whole[-1].event == "end" and whole[-1].json["reason"] == "length", whole[-1]


# ---------------------------------------------------------------- one frontend


def test_a_client_that_disconnects_resumes_with_last_event_id(one: Daemon) -> None:
    _, body, _ = submit(one, max_tokens=400)
    tid = body["task_id"]
    a = Raw(one, f"/v1/tasks/{tid}/stream")
    a.read_until(lambda r: tokens(r.events) >= 20)
    a.close()  # the connection drops mid-stream
    b = Raw(one, f"/v1/tasks/{tid}/stream", last_id=ids(a.events)[-1])
    assert b.status == 200
    check_rest(a.events, b.read_to_end(), 400)


def test_a_stream_resumes_after_its_task_ended_while_nobody_read_it(one: Daemon) -> None:
    _, body, _ = submit(one, max_tokens=60)
    tid = body["task_id"]
    a = Raw(one, f"/v1/tasks/{tid}/stream")
    a.read_until(lambda r: tokens(r.events) >= 5)
    a.close()
    one.wait_log(
        lambda r: r.get("narration") == "stream ended" and r.get("task_id", "").endswith(tid), 30
    )
    b = Raw(one, f"/v1/tasks/{tid}/stream", last_id=ids(a.events)[-1])
    check_rest(a.events, b.read_to_end(), 60)


def test_a_disconnect_cancels_only_after_the_grace(one: Daemon) -> None:
    _, body, _ = submit(one, max_tokens=10_000, deadline_ms=600_000)
    tid = body["task_id"]
    a = Raw(one, f"/v1/tasks/{tid}/stream")
    a.read_until(lambda r: tokens(r.events) >= 3)
    left = time.monotonic()
    a.close()
    rec = one.wait_log(
        lambda r: r.get("narration") == "stream ended" and r.get("task_id", "").endswith(tid),
        GRACE_MS / 1000 + 20,
    )
    waited = time.monotonic() - left
    assert rec["reason"] == "canceled"
    assert waited >= GRACE_MS / 1000 - 0.3, f"canceled after {waited:.2f} s, before the grace"
    # Its transcript is still there: a late resume gets the rest and the one `end canceled`.
    b = Raw(one, f"/v1/tasks/{tid}/stream", last_id=ids(a.events)[-1])
    rest = b.read_to_end()
    assert ids(rest)[0] == ids(a.events)[-1] + 1
    assert [e.event for e in rest if e.event in TERMINAL] == ["end"]
    assert rest[-1].json["reason"] == "canceled"


def test_a_second_get_is_409_and_last_event_id_takes_the_stream_over(one: Daemon) -> None:
    _, body, _ = submit(one, max_tokens=600)
    tid = body["task_id"]
    a = Raw(one, f"/v1/tasks/{tid}/stream")
    a.read_until(lambda r: tokens(r.events) >= 10)
    second = SyncStream(one.host, one.port, f"/v1/tasks/{tid}/stream", one.headers)
    assert second.status == 409  # (checked against contracts/openapi/data.yaml)
    assert json.loads(second.body)["code"] == "STREAM_CONFLICT"
    second.close()
    a.read_until(lambda r: tokens(r.events) >= 20)
    sent = ids(a.events)[-1]
    b = Raw(one, f"/v1/tasks/{tid}/stream", last_id=sent)
    assert b.status == 200
    # The old connection ends with one error, about the connection: no id, not retriable.
    old = a.read_to_end()
    assert old[-1].event == "error" and old[-1].id is None
    assert old[-1].json["code"] == "STREAM_CONFLICT" and not old[-1].json["retriable"]
    rest = b.read_to_end()
    check_rest([e for e in old if e.id is not None and int(e.id) <= sent], rest, 600)
    # What the old one got past `sent` (in flight at the take-over) are the same events.
    late = [e for e in old if e.id is not None and int(e.id) > sent]
    assert late == rest[: len(late)]


def test_a_bad_last_event_id_is_a_clear_400(one: Daemon) -> None:
    _, body, _ = submit(one, max_tokens=3)
    r = httpx.get(
        f"{one.base}/v1/tasks/{body['task_id']}/stream",
        headers={**one.headers, "Last-Event-ID": "seven"},
    )
    assert r.status_code == 400
    assert r.json()["code"] == "INVALID_PARAMS" and "Last-Event-ID" in r.json()["message"]


# ---------------------------------------------------------------- the OpenAI routes


def openai_frames(resp: httpx.Response) -> list[tuple[int | None, str]]:
    """(id, data) of each frame of an OpenAI chunk stream."""
    out, eid, data = [], None, ""
    for line in resp.iter_lines():
        if line.startswith("id: "):
            eid = int(line[4:])
        elif line.startswith("data: "):
            data = line[6:]
        elif line == "" and data:
            out.append((eid, data))
            eid, data = None, ""
    return out


def test_an_openai_chat_stream_resumes_with_last_event_id(one: Daemon) -> None:
    client = openai.OpenAI(base_url=f"{one.base}/v1", api_key=one.key, max_retries=0)
    req: dict[str, Any] = {
        "model": "mock:tiny",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 300,
        "seed": 7,
    }
    whole = client.chat.completions.create(**req).choices[0].message.content
    stream = client.chat.completions.create(**req, stream=True)
    got, chunk_id = [], ""
    for chunk in stream:
        chunk_id = chunk.id
        got.append(chunk.choices[0].delta.content or "")
        if len(got) == 20:
            break
    stream.close()  # the connection drops after 20 chunks: ids 0 (the role) .. 19
    with httpx.stream(
        "GET",
        f"{one.base}/v1/tasks/{chunk_id}/stream",
        headers={**one.headers, "Last-Event-ID": "19"},
        timeout=30,
    ) as resp:
        assert resp.status_code == 200
        frames = openai_frames(resp)
    assert frames[0][0] == 20 and frames[-1] == (None, "[DONE]")
    seqs = [i for i, _ in frames if i is not None]
    assert seqs == list(range(20, 20 + len(seqs)))
    rest = [json.loads(d) for _, d in frames[:-1]]
    assert all(c["id"] == chunk_id for c in rest)
    text = "".join(got) + "".join(c["choices"][0]["delta"].get("content") or "" for c in rest)
    assert text == whole  # nothing lost, nothing twice
    assert rest[-1]["choices"][0]["finish_reason"] == "length"


def test_an_openai_completions_stream_resumes_with_last_event_id(one: Daemon) -> None:
    body = {"model": "mock:tiny", "prompt": "hi", "max_tokens": 200, "seed": 3}
    whole = httpx.post(f"{one.base}/v1/completions", json=body, headers=one.headers, timeout=30)
    want = whole.json()["choices"][0]["text"]
    with httpx.stream(
        "POST",
        f"{one.base}/v1/completions",
        json={**body, "stream": True},
        headers=one.headers,
        timeout=30,
    ) as resp:
        first: list[tuple[int | None, str]] = []
        for frame in openai_frames(resp):
            first.append(frame)
            if len(first) == 10:
                break  # (leaving the block closes the connection mid-stream)
    cid = json.loads(first[0][1])["id"]
    last = first[-1][0]
    assert last is not None
    with httpx.stream(
        "GET",
        f"{one.base}/v1/tasks/{cid}/stream",
        headers={**one.headers, "Last-Event-ID": str(last)},
        timeout=30,
    ) as resp:
        rest = openai_frames(resp)
    assert rest[0][0] == last + 1 and rest[-1] == (None, "[DONE]")
    chunks = [json.loads(d) for _, d in first + rest[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == want


# ---------------------------------------------------------------- frontends that fail


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("resume2"), PAIR, frontends=2) as d:
        yield d


def frontend_proc(d: Daemon, index: str) -> Any:
    return d.find("orchd.frontend.main", index)


def test_a_stream_whose_frontend_is_killed_resumes_on_another(pair: Daemon) -> None:
    _, b1, _ = submit(pair, max_tokens=500)
    _, b2, _ = submit(pair, max_tokens=300)
    a = Raw(pair, f"/v1/tasks/{b1['task_id']}/stream")
    victim = a.headers["x-orchd-frontend"]
    c = Raw(pair, f"/v1/tasks/{b2['task_id']}/stream", frontend=victim)
    a.read_until(lambda r: tokens(r.events) >= 30)
    c.read_until(lambda r: tokens(r.events) >= 3)
    proc = frontend_proc(pair, victim)
    killed = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    a.read_to_end(timeout=10)  # what was on the wire, then the connection is gone
    c.read_to_end(timeout=10)
    assert a.eof and not any(e.event in TERMINAL for e in a.events)
    # The client reconnects at once: the survivor (or the victim's restart) serves it.
    b = reconnect(pair, f"/v1/tasks/{b1['task_id']}/stream", ids(a.events)[-1])
    assert b.status == 200
    check_rest(a.events, b.read_to_end(), 500)
    resumed_s = b.first_event_at - killed
    print(f"\nresume after frontend SIGKILL: first event {resumed_s * 1000:.0f} ms after the kill")
    assert resumed_s < 5.0
    # Reopened without Last-Event-ID: the whole stream again, from `started`, one terminal.
    d = reconnect(pair, f"/v1/tasks/{b2['task_id']}/stream", -1)
    again = d.read_to_end()
    assert again[0].event == "started" and ids(again) == list(range(len(again)))
    assert [e.event for e in again if e.event in TERMINAL] == ["end"]
    assert again[-1].json["reason"] == "length" and tokens(again) == 300


def test_a_paused_frontend_ends_its_streams_retriably_and_they_resume(pair: Daemon) -> None:
    _, body, _ = submit(pair, max_tokens=3000, deadline_ms=600_000)  # 30 s: outlives the pause
    tid = body["task_id"]
    a = Raw(pair, f"/v1/tasks/{tid}/stream")
    a.read_until(lambda r: tokens(r.events) >= 20)
    index = a.headers["x-orchd-frontend"]
    proc = frontend_proc(pair, index)
    os.kill(proc.pid, signal.SIGSTOP)
    paused = time.monotonic()
    try:
        pair.wait_log(
            lambda r: r.get("peer") == f"fe{index}" and "dead" in r.get("narration", ""), 30
        )
        # The fault is a 15 s pause: hold it that long (the scheduler gave up at ~10 s).
        time.sleep(max(0.0, paused + PAUSE_S - time.monotonic()))
    finally:
        with contextlib.suppress(ProcessLookupError):  # (a watchdog may have replaced it)
            os.kill(proc.pid, signal.SIGCONT)
    old = a.read_to_end(timeout=30)
    assert not any(e.event == "end" and e.json["reason"] == "canceled" for e in old)
    # The frontend, awake, ends the stream with one retriable error about the connection (no
    # id); had a watchdog killed it instead, the connection just closed. Either way: resume.
    ended = [e for e in old if e.event in TERMINAL]
    assert ended == [old[-1]] or (ended == [] and not proc.is_running())
    if ended:
        assert old[-1].event == "error" and old[-1].id is None, old[-1]
        assert old[-1].json["code"] == "STREAM_INTERRUPTED" and old[-1].json["retriable"]
    b = reconnect(pair, f"/v1/tasks/{tid}/stream", ids(old)[-1])
    check_rest(old, b.read_to_end(timeout=60), 3000)


def test_an_ended_stream_opened_again_is_the_whole_stream_again(one: Daemon) -> None:
    """`curl .../stream` twice: the second GET, after the end, replays the same events (ids
    included) rather than a 409: nothing live is left to contest."""
    status, body, _ = submit(one, max_tokens=8)
    assert status == 202
    path = f"/v1/tasks/{body['task_id']}/stream"
    first = SyncStream(one.host, one.port, path, one.headers)
    first.read_to_end()
    first.close()
    again = SyncStream(one.host, one.port, path, one.headers)
    assert again.status == 200, again.body
    again.read_to_end()
    again.close()
    assert [(e.event, e.id, e.data) for e in again.events] == [
        (e.event, e.id, e.data) for e in first.events
    ]
    assert [e.event for e in first.events].count("end") == 1
