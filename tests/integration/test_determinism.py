"""Seeded determinism through the whole pipeline: same seed, same bytes; other seed, other."""

from __future__ import annotations

from tests.integration.conftest import run_task, stream, submit
from tests.support.daemon import Daemon


def token_frames(raw: bytes) -> list[bytes]:
    return [f for f in raw.split(b"\n\n") if f.startswith(b"event: token")]


def test_same_seed_same_bytes_other_seed_other_tokens(daemon: Daemon) -> None:
    a = run_task(daemon, seed=1234, prompt="the same prompt", max_tokens=64)
    b = run_task(daemon, seed=1234, prompt="the same prompt", max_tokens=64)
    c = run_task(daemon, seed=1235, prompt="the same prompt", max_tokens=64)
    fa, fb, fc = (token_frames(bytes(s.sse.raw)) for s in (a, b, c))
    assert len(fa) == 64
    assert fa == fb
    assert fa != fc


def test_determinism_holds_across_both_replicas(daemon: Daemon) -> None:
    # Two tasks in flight at once: the second is placed on the other, idle replica.
    ids = []
    for _ in range(2):
        status, body, _ = submit(daemon, seed=99, prompt="across replicas", max_tokens=200)
        assert status == 202
        ids.append(body["task_id"])
    streams = [stream(daemon, tid) for tid in ids]
    for s in streams:
        s.read_to_end()
    assert {s.events[0].json["replica_id"] for s in streams} == {"r0", "r1"}
    a, b = (token_frames(bytes(s.sse.raw)) for s in streams)
    assert len(a) == 200 and a == b


def test_prompt_changes_the_stream(daemon: Daemon) -> None:
    a = run_task(daemon, seed=5, prompt="one", max_tokens=32)
    b = run_task(daemon, seed=5, prompt="two", max_tokens=32)
    assert token_frames(bytes(a.sse.raw)) != token_frames(bytes(b.sse.raw))
