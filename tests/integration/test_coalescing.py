"""Token coalescing (stream_interval): the first token goes at once, later ones in writes of
N tokens (or on a short timer); every token is still its own SSE event, in order."""

from __future__ import annotations

from pathlib import Path

from tests.integration.conftest import run_task
from tests.integration.test_streaming import check_stream
from tests.support.daemon import Daemon

CONFIG = """
[scheduling]
stream_interval_tokens = {n}
stream_interval_ms = 50

[[replicas]]
id = "r0"
[replicas.mock]
itl_ms = 2
"""


def writes_and_events(tmp: Path, n: int) -> tuple[int, int]:
    d = Daemon(tmp, CONFIG.format(n=n)).start()
    try:
        s = run_task(d, max_tokens=160)
        check_stream(s.events, 160)
        return s.dechunk.chunks, len(s.events)
    finally:
        assert d.stop() == 0


def test_coalescing_batches_writes_not_events(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "coalesced").mkdir()
    plain_writes, plain_events = writes_and_events(tmp_path / "plain", 1)
    coalesced_writes, coalesced_events = writes_and_events(tmp_path / "coalesced", 8)
    assert coalesced_events == plain_events  # the same events either way
    # 160 tokens in writes of 8 (plus started, the first token, end): far fewer writes.
    assert coalesced_writes <= 160 // 8 + 6, coalesced_writes
    assert plain_writes > 2 * coalesced_writes, (plain_writes, coalesced_writes)
