"""The shared-memory SPSC token ring (ipc/ring.py)."""

from __future__ import annotations

import collections
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from uuid import uuid4

import posix_ipc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ipc.doorbell import BellReader, create_bell
from ipc.ring import (
    ALIGN,
    HEADER_BYTES,
    REC_HDR_SIZE,
    Record,
    RingError,
    RingReader,
    RingWriter,
    create_ring,
    record_size,
    unlink_ring,
)

REPO = Path(__file__).resolve().parents[2]


def read_all(r: RingReader) -> list[Record]:
    """Every published record, copied out of the ring (``records()`` yields views)."""
    return [Record(x.slot, x.seq, x.kind, memoryview(bytes(x.payload))) for x in r.records()]


def ring_name() -> str:
    return f"/orchd-test-{os.getpid()}-{uuid4().hex[:8]}"


@pytest.fixture
def names() -> Iterator[list[str]]:
    """Ring names to unlink at the end of the test, whatever happened."""
    made: list[str] = []
    yield made
    for name in made:
        unlink_ring(name)


@pytest.fixture
def make_ring(names: list[str]):
    def make(capacity: int = 4096) -> str:
        name = ring_name()
        names.append(name)
        create_ring(name, capacity)
        return name

    return make


def payload_for(seq: int, length: int) -> bytes:
    """Distinct, position-dependent bytes so a misplaced byte shows."""
    base = bytes(range(256)) * ((length // 256) + 2)
    start = seq % 256
    return base[start : start + length]


# ---------------------------------------------------------------- basics


def test_single_record_round_trip(make_ring) -> None:
    name = make_ring(4096)
    w, r = RingWriter(name), RingReader(name)
    try:
        assert read_all(r) == []
        payload = b'event: token\nid: 17\ndata: {"t":"Hi","i":17}\n\n'
        assert w.write_batch([(5, 17, 2, payload)]) == 1
        assert r.pending() == record_size(len(payload))
        recs = read_all(r)
        assert len(recs) == 1
        rec = recs[0]
        assert (rec.slot, rec.seq, rec.kind) == (5, 17, 2)
        assert bytes(rec.payload) == payload
        assert r.pending() == 0
        assert read_all(r) == []
        assert w.free_bytes() == 4096
    finally:
        w.close()
        r.close()


def test_empty_payload_and_large_header_values(make_ring) -> None:
    name = make_ring(4096)
    w, r = RingWriter(name), RingReader(name)
    try:
        assert w.write_batch([(0xFFFFFFFF, 0xFFFFFFFE, 255, b"")]) == 1
        (rec,) = read_all(r)
        assert (rec.slot, rec.seq, rec.kind, bytes(rec.payload)) == (
            0xFFFFFFFF,
            0xFFFFFFFE,
            255,
            b"",
        )
    finally:
        w.close()
        r.close()


def test_many_records_one_batch_one_publish(make_ring) -> None:
    name = make_ring(1 << 16)
    w, r = RingWriter(name), RingReader(name)
    try:
        recs = [(i % 7, i, i % 3, payload_for(i, i * 3)) for i in range(100)]
        assert w.write_batch(iter(recs)) == 100
        assert r.pending() == sum(record_size(len(p)) for *_, p in recs)
        got = read_all(r)
        assert [(g.slot, g.seq, g.kind, bytes(g.payload)) for g in got] == recs
    finally:
        w.close()
        r.close()


def test_batch_is_published_once_not_per_record(make_ring) -> None:
    """The reader must see nothing of a batch until write_batch returns: the records are
    produced lazily, and the reader checks what is published while the batch is being written."""
    name = make_ring(1 << 16)
    w, r = RingWriter(name), RingReader(name)
    seen_pending: list[int] = []

    def gen():
        for i in range(10):
            seen_pending.append(r.pending())
            yield (0, i, 0, b"x" * 20)

    try:
        assert w.write_batch(gen()) == 10
        assert seen_pending == [0] * 10
        assert r.pending() == 10 * record_size(20)
        assert [rec.seq for rec in read_all(r)] == list(range(10))
    finally:
        w.close()
        r.close()


def test_record_size_alignment() -> None:
    assert REC_HDR_SIZE == 13
    assert record_size(0) == 16
    assert record_size(3) == 16
    assert record_size(4) == 32
    assert record_size(19) == 32
    assert record_size(20) == 48
    for n in range(0, 2000):
        size = record_size(n)
        assert size % ALIGN == 0
        assert REC_HDR_SIZE + n <= size < REC_HDR_SIZE + n + ALIGN


@pytest.mark.parametrize("capacity", [0, -4096, 3000, 4097, 4096 + 2048])
def test_capacity_must_be_power_of_two(capacity: int, names: list[str]) -> None:
    name = ring_name()
    names.append(name)
    with pytest.raises(RingError, match="power of two"):
        create_ring(name, capacity)
    # Nothing was left behind.
    assert unlink_ring(name) is False


def test_unlink_ring_reports_existence(names: list[str]) -> None:
    name = ring_name()
    names.append(name)
    create_ring(name, 4096)
    assert unlink_ring(name) is True
    assert unlink_ring(name) is False


def test_create_ring_twice_fails(make_ring) -> None:
    name = make_ring(4096)
    with pytest.raises(posix_ipc.ExistentialError):
        create_ring(name, 4096)


def test_record_that_can_never_fit_raises(make_ring) -> None:
    name = make_ring(4096)
    w, r = RingWriter(name), RingReader(name)
    try:
        # The largest payload whose record fills the whole ring still fits an empty ring.
        biggest = 4096 - REC_HDR_SIZE
        assert record_size(biggest) == 4096
        assert record_size(w.max_payload()) <= 4096
        with pytest.raises(RingError, match=r"4084 payload bytes can never fit a ring of 4096"):
            w.write_batch([(0, 0, 0, b"z" * (biggest + 1))])
        assert r.pending() == 0
        assert w.write_batch([(1, 1, 1, payload_for(1, biggest))]) == 1
        (rec,) = read_all(r)
        assert bytes(rec.payload) == payload_for(1, biggest)
    finally:
        w.close()
        r.close()


def test_full_ring_never_overwrites_unread_data(make_ring) -> None:
    cap = 4096
    name = make_ring(cap)
    w, r = RingWriter(name), RingReader(name)
    try:
        size = record_size(100)  # 128
        per_ring = cap // size  # 32
        recs = [(1, i, 0, payload_for(i, 100)) for i in range(per_ring + 10)]
        n = w.write_batch(recs)
        assert n == per_ring
        assert w.free_bytes() == 0
        # A full ring takes nothing more.
        assert w.write_batch(recs[n:]) == 0
        assert w.write_batch([(9, 9, 9, b"")]) == 0
        got = read_all(r)
        assert [(g.seq, bytes(g.payload)) for g in got] == [(s, p) for _, s, _, p in recs[:n]]
        # After the read the rest fits, and nothing was overwritten in between.
        assert w.write_batch(recs[n:]) == 10
        got = read_all(r)
        assert [(g.seq, bytes(g.payload)) for g in got] == [(s, p) for _, s, _, p in recs[n:]]
    finally:
        w.close()
        r.close()


def test_partial_batch_stops_at_first_record_that_does_not_fit(make_ring) -> None:
    """Order is kept: a small record behind a big one that does not fit is not written."""
    cap = 4096
    name = make_ring(cap)
    w, r = RingWriter(name), RingReader(name)
    try:
        assert w.write_batch([(0, 0, 0, b"a" * 3000)]) == 1
        # 3024 used, 1072 free: a 2000-byte record does not fit, a 10-byte one would.
        assert w.write_batch([(0, 1, 0, b"b" * 2000), (0, 2, 0, b"c" * 10)]) == 0
        assert [rec.seq for rec in read_all(r)] == [0]
    finally:
        w.close()
        r.close()


def test_wrap_around_many_rounds_small_ring(make_ring) -> None:
    cap = 4096
    name = make_ring(cap)
    w, r = RingWriter(name), RingReader(name)
    try:
        seq = 0
        straddled = 0
        written_bytes = 0
        # Lengths chosen so records land at every 16-byte offset and payloads cross the end.
        lengths = [0, 1, 3, 4, 17, 100, 250, 1000, 1500, 2900, 29, 77]
        for rnd in range(400):
            batch = []
            for k in range(1 + rnd % 4):
                plen = lengths[(rnd + k) % len(lengths)]
                batch.append((seq % 64, seq, seq % 256, payload_for(seq, plen)))
                seq += 1
            pending = list(batch)
            got = []
            while pending:
                start = written_bytes
                n = w.write_batch(pending)
                for _, _, _, p in pending[:n]:
                    off = start & (cap - 1)
                    if off + REC_HDR_SIZE + len(p) > cap:
                        straddled += 1
                    start += record_size(len(p))
                written_bytes = start
                pending = pending[n:]
                got += read_all(r)
            assert [(g.slot, g.seq, g.kind, bytes(g.payload)) for g in got] == batch
        assert straddled > 20, "the test must exercise payloads that wrap"
        assert written_bytes > 50 * cap
    finally:
        w.close()
        r.close()


def test_header_never_straddles_end(make_ring) -> None:
    """Fill so that a record starts in the last 16 bytes of the data area."""
    cap = 4096
    name = make_ring(cap)
    w, r = RingWriter(name), RingReader(name)
    try:
        # 4080 bytes of records: the next one starts at offset 4080 (cap - 16).
        assert w.write_batch([(0, 0, 0, b"f" * (4080 - REC_HDR_SIZE))]) == 1
        assert record_size(4080 - REC_HDR_SIZE) == 4080
        read_all(r)
        p = payload_for(7, 40)  # header at 4080..4093, 3 payload bytes, 37 wrap to the start
        assert w.write_batch([(3, 7, 1, p)]) == 1
        (rec,) = read_all(r)
        assert (rec.slot, rec.seq, rec.kind, bytes(rec.payload)) == (3, 7, 1, p)
    finally:
        w.close()
        r.close()


# ---------------------------------------------------------------- park / bell


def test_needs_bell_once_per_park_generation(make_ring) -> None:
    name = make_ring(4096)
    w, r = RingWriter(name), RingReader(name)
    try:
        # Nobody parked yet: no bell.
        assert w.needs_bell() is False
        assert r.park() is False  # nothing pending
        assert w.needs_bell() is True
        assert w.needs_bell() is False
        assert w.needs_bell() is False
        # A second park is a new generation: exactly one more bell.
        assert r.park() is False
        assert w.needs_bell() is True
        assert w.needs_bell() is False
        # Two parks without a check in between still make one bell.
        r.park()
        r.park()
        assert w.needs_bell() is True
        assert w.needs_bell() is False
    finally:
        w.close()
        r.close()


def test_park_returns_true_when_data_pending(make_ring) -> None:
    name = make_ring(4096)
    w, r = RingWriter(name), RingReader(name)
    try:
        assert w.write_batch([(0, 0, 0, b"hello")]) == 1
        assert r.park() is True
        read_all(r)
        assert r.park() is False
    finally:
        w.close()
        r.close()


# ---------------------------------------------------------------- restarts and attach


def test_reader_skip_existing_skips_unread_data(make_ring) -> None:
    name = make_ring(4096)
    w = RingWriter(name)
    r1 = RingReader(name)
    try:
        assert w.write_batch([(0, i, 0, b"old") for i in range(5)]) == 5
        r2 = RingReader(name, skip_existing=True)
        try:
            assert r2.pending() == 0
            assert read_all(r2) == []
            # The skip is stored: the writer sees the space as free again.
            assert w.free_bytes() == 4096
            assert w.write_batch([(0, 99, 0, b"new")]) == 1
            got = read_all(r2)
            assert [(g.seq, bytes(g.payload)) for g in got] == [(99, b"new")]
        finally:
            r2.close()
        # A reader without skip_existing starts from the published read_seq.
        r3 = RingReader(name)
        try:
            assert read_all(r3) == []
        finally:
            r3.close()
    finally:
        w.close()
        r1.close()


def test_reader_without_skip_reads_existing(make_ring) -> None:
    name = make_ring(4096)
    w = RingWriter(name)
    try:
        assert w.write_batch([(0, i, 0, b"x") for i in range(3)]) == 3
        r = RingReader(name)
        try:
            assert [rec.seq for rec in read_all(r)] == [0, 1, 2]
        finally:
            r.close()
    finally:
        w.close()


def test_restarted_writer_resumes_from_published_write_seq(make_ring) -> None:
    cap = 4096
    name = make_ring(cap)
    r = RingReader(name)
    w1 = RingWriter(name)
    try:
        assert w1.write_batch([(0, i, 0, payload_for(i, 50)) for i in range(3)]) == 3
        free_before = w1.free_bytes()
        w1.close()
        w2 = RingWriter(name)
        try:
            assert w2.free_bytes() == free_before
            assert w2.write_batch([(0, i, 0, payload_for(i, 50)) for i in range(3, 6)]) == 3
            got = read_all(r)
            assert [(g.seq, bytes(g.payload)) for g in got] == [
                (i, payload_for(i, 50)) for i in range(6)
            ]
            # ... and keeps going across a wrap.
            for rnd in range(100):
                batch = [(0, rnd, 0, payload_for(rnd, 300))]
                assert w2.write_batch(batch) == 1
                (rec,) = read_all(r)
                assert (rec.seq, bytes(rec.payload)) == (rnd, payload_for(rnd, 300))
        finally:
            w2.close()
    finally:
        r.close()


@pytest.mark.parametrize("side", [RingReader, RingWriter])
def test_attach_to_non_ring_segment_raises(side, names: list[str]) -> None:
    name = ring_name()
    names.append(name)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=HEADER_BYTES + 4096)
    shm.close_fd()
    with pytest.raises(RingError, match="is not an orchd ring"):
        side(name)


def test_attach_to_missing_segment_raises(names: list[str]) -> None:
    name = ring_name()
    names.append(name)
    with pytest.raises(posix_ipc.ExistentialError):
        RingReader(name)


# ---------------------------------------------------------------- model-based (hypothesis)

_op = st.one_of(
    st.tuples(st.just("write"), st.lists(st.integers(0, 3000), min_size=0, max_size=6)),
    st.tuples(st.just("read"), st.just([])),
)


@settings(
    max_examples=300,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(_op, min_size=1, max_size=60))
def test_ring_matches_model(ops) -> None:
    cap = 8192
    name = ring_name()
    create_ring(name, cap)
    try:
        w, r = RingWriter(name), RingReader(name)
        try:
            model: collections.deque[tuple[int, int, int, bytes]] = collections.deque()
            used = 0  # bytes of unread records, per the model
            seq = 0
            for op, lengths in ops:
                if op == "write":
                    batch = []
                    for plen in lengths:
                        batch.append((seq % 1000, seq, seq % 256, payload_for(seq, plen)))
                        seq += 1
                    # The model: records go in order until the first that does not fit.
                    fits = 0
                    room = cap - used
                    for *_, p in batch:
                        if record_size(len(p)) > room:
                            break
                        room -= record_size(len(p))
                        fits += 1
                    n = w.write_batch(batch)
                    assert n == fits
                    for rec in batch[:n]:
                        model.append(rec)
                        used += record_size(len(rec[3]))
                    assert w.free_bytes() == cap - used
                    assert r.pending() == used
                else:
                    got = [(g.slot, g.seq, g.kind, bytes(g.payload)) for g in read_all(r)]
                    assert got == list(model)
                    model.clear()
                    used = 0
            got = [(g.slot, g.seq, g.kind, bytes(g.payload)) for g in read_all(r)]
            assert got == list(model)
        finally:
            w.close()
            r.close()
    finally:
        unlink_ring(name)


# ---------------------------------------------------------------- two processes, 1M records

PRODUCER = r"""
import os, sys
from ipc.ring import RingWriter
from ipc.doorbell import BellWriter

name, bell_path, total, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
w = RingWriter(name)
bell = BellWriter(bell_path)

def payload(s):
    return s.to_bytes(4, "little") * (1 + s % 8)

seq = 0
while seq < total:
    end = min(seq + batch, total)
    pending = [(s & 0xFFFF, s, s % 7, payload(s)) for s in range(seq, end)]
    while pending:
        n = w.write_batch(pending)
        if n:
            pending = pending[n:]
            if w.needs_bell():
                bell.ring()
        else:
            os.sched_yield()  # full: the consumer is draining; try again
    seq = end
w.close()
bell.close()
"""


def _payload(s: int) -> bytes:
    return s.to_bytes(4, "little") * (1 + s % 8)


def test_two_processes_million_records(make_ring, tmp_path: Path) -> None:
    total, batch = 1_000_000, 64
    name = make_ring(1 << 20)
    bell_path = str(tmp_path / "fe0.bell")
    create_bell(bell_path)
    bell = BellReader(bell_path)
    reader = RingReader(name)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-c", PRODUCER, name, bell_path, str(total), str(batch)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    expected = 0
    parks = 0
    try:
        while expected < total:
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {expected} of {total} records")
            recs = read_all(reader)
            if recs:
                for rec in recs:
                    s = expected
                    if (
                        rec.seq != s
                        or rec.slot != s & 0xFFFF
                        or rec.kind != s % 7
                        or rec.payload != _payload(s)
                    ):
                        pytest.fail(
                            f"record {s}: got slot={rec.slot} seq={rec.seq} kind={rec.kind} "
                            f"payload={bytes(rec.payload)!r}"
                        )
                    expected += 1
                continue
            if proc.poll() is not None and reader.pending() == 0:
                break  # the producer is gone and nothing more is published
            if not reader.park():
                parks += 1
                select.select([bell.fd], [], [], 0.05)  # the periodic recheck bounds a lost wake
                bell.clear()
        rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        err = proc.stderr.read().decode() if proc.stderr else ""
        assert rc == 0, err
        assert expected == total, err
        # Exactly once: nothing is left over after the last record.
        assert reader.pending() == 0
        assert read_all(reader) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
        reader.close()
        bell.close()


# ---------------------------------------------------------------- records(): the zero-copy drain


def drain(r: RingReader, invariant: Callable[[], bool]) -> list[tuple[int, int, int, bytes]]:
    """Everything ``records()`` yields, copied out (its views die with this frame, as they
    must before the ring is closed), checking ``invariant`` at each record."""
    got = []
    for rec in r.records():
        got.append((rec.slot, rec.seq, rec.kind, bytes(rec.payload)))
        assert invariant()  # e.g. nothing is released mid-iteration
    return got


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(st.lists(st.integers(min_value=0, max_value=700), max_size=12), max_size=30))
def test_records_yields_every_record_across_wraps_and_frees_space_at_the_end(
    make_ring, batches: list[list[int]]
) -> None:
    name = make_ring(4096)
    w, r = RingWriter(name), RingReader(name)
    try:
        seq = 0
        for lengths in batches:
            recs = []
            for n in lengths:
                recs.append((seq % 5, seq, seq % 3, payload_for(seq, n)))
                seq += 1
            written = w.write_batch(iter(recs))
            before = w.free_bytes()
            assert drain(r, lambda b=before: w.free_bytes() == b) == recs[:written]
            assert r.pending() == 0 and w.free_bytes() == 4096
    finally:
        w.close()
        r.close()


def test_records_stopped_early_releases_only_what_was_read(make_ring) -> None:
    name = make_ring(4096)
    w, r = RingWriter(name), RingReader(name)
    try:
        recs = [(1, i, 0, payload_for(i, 40)) for i in range(5)]
        w.write_batch(iter(recs))
        it = r.records()
        assert [next(it).seq, next(it).seq] == [0, 1]
        it.close()  # the consumer stops after two: the other three stay published
        assert [rec.seq for rec in read_all(r)] == [2, 3, 4]
    finally:
        w.close()
        r.close()
