"""Single-producer single-consumer byte ring in POSIX shared memory.

One ring joins one engine supervisor (the producer) to one frontend (the consumer).
Every shared word has exactly one writer:

    producer: write_seq (bytes published), rung_gen (last park generation it rang for)
    consumer: read_seq (bytes consumed),   park_gen (bumped each time it parks)

A publish writes payload bytes first and then stores ``write_seq`` once for the whole batch.
The consumer reads everything in ``[read_seq, write_seq)`` and stores ``read_seq`` once.
Sequence words are monotonic byte counts, so ``write_seq - read_seq`` is the fill level and a
full ring never overwrites unread data: the producer keeps what does not fit and retries.

Record layout (16-byte aligned, so a header never straddles the end of the data area):

    [u32 length][u32 task slot][u32 event seq][u8 kind][payload ...][pad to 16]

The payload is a finished SSE frame (or several, concatenated) that the consumer copies
straight onto the wire.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import numpy as np
import posix_ipc

MAGIC = 0x4F52434844524E47  # "ORCHDRNG"
VERSION = 1
HEADER_BYTES = 4096
ALIGN = 16
REC_HDR = struct.Struct("<IIIB")
REC_HDR_SIZE = REC_HDR.size  # 13

# Word indexes into the header (u64 words, each on its own 64-byte line).
_W_MAGIC, _W_VERSION, _W_CAPACITY = 0, 1, 2
_W_WRITE_SEQ = 8
_W_RUNG_GEN = 16
_W_READ_SEQ = 24
_W_PARK_GEN = 32


class RingError(Exception):
    """Raised for misuse of a ring: a record that can never fit, a bad segment."""


class Record(NamedTuple):
    slot: int
    seq: int
    kind: int
    payload: memoryview


def record_size(payload_len: int) -> int:
    """Bytes a record with ``payload_len`` payload bytes occupies in the ring."""
    return (REC_HDR_SIZE + payload_len + ALIGN - 1) & ~(ALIGN - 1)


def shm_free_bytes() -> int | None:
    """Free bytes on /dev/shm, or None where it cannot be read."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


class _Segment:
    """A mapped POSIX shared-memory segment viewed as header words plus a data area."""

    def __init__(self, name: str, create: bool, capacity: int = 0) -> None:
        self.name = name
        if create:
            if capacity <= 0 or capacity & (capacity - 1):
                raise RingError(f"ring capacity must be a power of two, got {capacity}")
            shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=HEADER_BYTES + capacity)
        else:
            shm = posix_ipc.SharedMemory(name)
        try:
            self._mm = mmap.mmap(shm.fd, shm.size)
        finally:
            shm.close_fd()
        self.words = np.ndarray((HEADER_BYTES // 8,), dtype=np.uint64, buffer=self._mm)
        if create:
            self.words[_W_CAPACITY] = capacity
            self.words[_W_VERSION] = VERSION
            self.words[_W_MAGIC] = MAGIC
        elif int(self.words[_W_MAGIC]) != MAGIC or int(self.words[_W_VERSION]) != VERSION:
            raise RingError(f"shared memory segment {name} is not an orchd ring v{VERSION}")
        self.capacity = int(self.words[_W_CAPACITY])
        self.mask = self.capacity - 1
        self.data = memoryview(self._mm)[HEADER_BYTES : HEADER_BYTES + self.capacity]

    def close(self) -> None:
        del self.words
        self.data.release()
        self._mm.close()


def create_ring(name: str, capacity: int) -> None:
    """Create (and zero) a ring segment; the launcher does this once per pair."""
    _Segment(name, create=True, capacity=capacity).close()


def unlink_ring(name: str) -> bool:
    """Remove a ring segment; True if it existed."""
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        return False
    return True


class RingWriter:
    """Producer side. Not thread-safe: one writer per ring, by design."""

    def __init__(self, name: str) -> None:
        self._seg = _Segment(name, create=False)
        self.capacity = self._seg.capacity
        self._w = self._seg.words
        # A restarted producer resumes from the last published sequence: anything it had
        # written but not published is simply overwritten.
        self._write_seq = int(self._w[_W_WRITE_SEQ])

    def max_payload(self) -> int:
        return self.capacity - ALIGN - REC_HDR_SIZE

    def free_bytes(self) -> int:
        return self.capacity - (self._write_seq - int(self._w[_W_READ_SEQ]))

    def write_batch(self, records: Iterable[tuple[int, int, int, bytes]]) -> int:
        """Write records in order until one does not fit; publish once. Returns the count written.

        Raises RingError for a record that could never fit, even in an empty ring.
        """
        seg = self._seg
        data, mask, cap = seg.data, seg.mask, seg.capacity
        free = cap - (self._write_seq - int(self._w[_W_READ_SEQ]))
        pos = self._write_seq
        n = 0
        for slot, seq, kind, payload in records:
            plen = len(payload)
            size = record_size(plen)
            if size > cap:
                raise RingError(
                    f"record of {plen} payload bytes can never fit a ring of {cap} bytes"
                )
            if size > free:
                break
            off = pos & mask
            REC_HDR.pack_into(data, off, plen, slot, seq, kind)
            start = off + REC_HDR_SIZE
            first = cap - start
            if first >= plen:
                data[start : start + plen] = payload
            else:
                # The payload wraps: its tail goes to the start of the data area.
                if first > 0:
                    data[start:cap] = payload[:first]
                data[0 : plen - first] = payload[first:]
            pos += size
            free -= size
            n += 1
        if n:
            self._write_seq = pos
            self._w[_W_WRITE_SEQ] = pos  # the publish: one store for the whole batch
        return n

    def needs_bell(self) -> bool:
        """True once per consumer park: the caller then rings the doorbell."""
        gen = int(self._w[_W_PARK_GEN])
        if gen != int(self._w[_W_RUNG_GEN]):
            self._w[_W_RUNG_GEN] = gen
            return True
        return False

    def close(self) -> None:
        self._seg.close()


class RingReader:
    """Consumer side. Not thread-safe: one reader per ring, by design."""

    def __init__(self, name: str, *, skip_existing: bool = False) -> None:
        self._seg = _Segment(name, create=False)
        self.capacity = self._seg.capacity
        self._w = self._seg.words
        if skip_existing:
            # A restarted consumer has no streams: whatever is unread belongs to nobody.
            self._w[_W_READ_SEQ] = self._w[_W_WRITE_SEQ]
        self._read_seq = int(self._w[_W_READ_SEQ])

    def pending(self) -> int:
        return int(self._w[_W_WRITE_SEQ]) - self._read_seq

    def records(self) -> Iterator[Record]:
        """Consume every published record, yielding each one as a view of the ring itself:
        no copy of the span and no list of it, so that a long drain costs no memory. A payload is valid only until the iteration ends (then
        ``read_seq`` is stored, once, and the producer may reuse the space): copy it out."""
        seg = self._seg
        data, mask, cap = seg.data, seg.mask, seg.capacity
        end = int(self._w[_W_WRITE_SEQ])
        pos = self._read_seq
        unpack = REC_HDR.unpack_from
        try:
            while pos < end:
                off = pos & mask
                plen, slot, seq, kind = unpack(data, off)
                pos += record_size(plen)
                s = off + REC_HDR_SIZE
                if s + plen <= cap:
                    payload = data[s : s + plen]
                else:  # the payload wraps: its tail is at the start of the data area
                    payload = memoryview(bytes(data[s:cap]) + bytes(data[0 : s + plen - cap]))
                yield Record(slot, seq, kind, payload)
        finally:
            if pos != self._read_seq:
                self._read_seq = pos
                self._w[_W_READ_SEQ] = pos

    def park(self) -> bool:
        """Advertise that the consumer is about to sleep. Returns True if data arrived meanwhile
        (the caller should drain instead of sleeping)."""
        self._w[_W_PARK_GEN] = int(self._w[_W_PARK_GEN]) + 1
        return int(self._w[_W_WRITE_SEQ]) != self._read_seq

    def close(self) -> None:
        self._seg.close()
