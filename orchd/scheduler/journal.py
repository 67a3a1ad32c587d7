"""The scheduler's durable journal on disk: admitted tasks and sessions survive a restart.

The records and what they mean are :mod:`orchd.core.journal`; how a new core takes them over
is :mod:`orchd.core.recovery`. This is the file around them:

- ``<state_dir>/journal.bin``: append-only frames ``[u32 length][u32 crc32][msgpack record]``.
  Everything one loop turn made is written with one ``write`` before anything of that turn is
  sent: from then on it survives the death of any orchd process (it is in the kernel's page
  cache). A turn that admitted tasks is also made durable against a power loss with one
  ``fdatasync`` before its replies to frontends (the 202s) are sent; the supervisors' messages
  (dispatches) go out before that fsync, so it does not delay a first token. Other records
  (starts, ends, sessions) are fsynced with the next admission, or within ``LAZY_SYNC_S``.
  After a power loss a task whose start or end record was not yet fsynced runs again.
- A torn or corrupt tail (a crash mid-write) ends the replay there and is cut off.
- Compaction: once the file is larger than ``max(COMPACT_MIN_BYTES, COMPACT_GROWTH x its size
  after the last compaction)``, it is rewritten as a snapshot of what the core knows (queued
  and running tasks, ended ones within their retention, sessions) to a temporary file,
  fsynced and renamed over it. The file is thus bounded by that limit plus one turn's
  records, and the rewrite costs O(live state), amortized O(1) per record. It is also
  compacted at every start.
- ``<state_dir>/lock``: held (``flock``) while a scheduler uses the directory; a second orchd
  pointed at the same directory refuses to start. The kernel drops it when a scheduler dies.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib

import msgspec

from orchd import log
from orchd.core import recovery
from orchd.core.journal import Admit, Record, decode, encode, replay
from orchd.core.scheduler import SchedulerCore

FRAME = struct.Struct("<II")  # length, crc32 of the record
COMPACT_MIN_BYTES = 8 << 20
COMPACT_GROWTH = 2
LAZY_SYNC_S = 1.0  # records with no 202 waiting on them reach the disk within this
MAX_RECORD_BYTES = 64 << 20  # a length past this is a corrupt frame, not a record


class JournalError(Exception):
    """The state directory cannot be used (another orchd holds it, or it is not writable)."""


def frames(records: list[Record]) -> bytes:
    parts = []
    for rec in records:
        data = encode(rec)
        parts.append(FRAME.pack(len(data), zlib.crc32(data)))
        parts.append(data)
    return b"".join(parts)


def parse(buf: bytes) -> tuple[list[Record], int]:
    """The records of ``buf`` up to the first torn or corrupt frame, and where that is."""
    out: list[Record] = []
    at, n = 0, len(buf)
    while at + FRAME.size <= n:
        length, crc = FRAME.unpack_from(buf, at)
        end = at + FRAME.size + length
        if length > MAX_RECORD_BYTES or end > n:
            break
        data = buf[at + FRAME.size : end]
        if zlib.crc32(data) != crc:
            break
        try:
            out.append(decode(data))
        except msgspec.DecodeError:
            break
        at = end
    return out, at


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class JournalFile:
    def __init__(self, directory: str) -> None:
        try:
            os.makedirs(directory, mode=0o700, exist_ok=True)
            self.lock_fd = os.open(os.path.join(directory, "lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise JournalError(f"state directory {directory}: {e.strerror}") from e
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.lock_fd)
            raise JournalError(
                f"state directory {directory} is in use by another orchd; give each its own "
                "server.state_dir"
            ) from None
        self.dir = directory
        self.path = os.path.join(directory, "journal.bin")
        self.fd = -1
        self.size = 0
        self.base = 0  # its size after the last compaction

    def read(self) -> list[Record]:
        try:
            with open(self.path, "rb") as f:
                buf = f.read()
        except FileNotFoundError:
            return []
        records, good = parse(buf)
        if good < len(buf):
            log.warning(
                "journal: cut off a torn or corrupt tail (a crash mid-write)",
                path=self.path,
                bytes_dropped=len(buf) - good,
            )
        return records

    def append(self, records: list[Record]) -> None:
        data = frames(records)
        _write_all(self.fd, data)
        self.size += len(data)

    def sync(self) -> None:
        os.fdatasync(self.fd)

    def due(self) -> bool:
        return self.size > max(COMPACT_MIN_BYTES, COMPACT_GROWTH * self.base)

    def compact(self, records: list[Record]) -> None:
        data = frames(records)
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
        dfd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dfd)  # the rename itself is durable
        finally:
            os.close(dfd)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = self.base = len(data)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            os.close(self.lock_fd)


class Journal:
    """The core's journal: replayed into it at start, fed from it once per loop turn."""

    def __init__(self, core: SchedulerCore, directory: str, now: float, adopt_ms: float) -> None:
        self.core = core
        self.file = JournalFile(directory)
        state = replay(self.file.read())
        recovery.restore(core, state, now, adopt_ms)
        self.file.compact(recovery.snapshot(core))
        recovery.take(core)  # (what the restore changed is in the snapshot)
        self.admitted = False  # written records a 202 waits on, not yet fsynced
        self.unsynced_at: float | None = None  # when the oldest unsynced record was written
        live = state.live()
        log.info(
            "journal replayed",
            path=self.file.path,
            queued=sum(1 for e in live if not e.replica),
            started=sum(1 for e in live if e.replica),
            sessions=len(core.sessions.sessions),
            bytes=self.file.size,
        )

    def commit(self, now_s: float) -> int:
        """Write this turn's records (one write; :meth:`sync` makes them durable); the bytes
        written."""
        records = recovery.take(self.core)
        if not records:
            return 0
        before = self.file.size
        self.file.append(records)
        written = self.file.size - before
        self.admitted = self.admitted or any(type(r) is Admit for r in records)
        if self.unsynced_at is None:
            self.unsynced_at = now_s
        if self.file.due():
            self.file.compact(recovery.snapshot(self.core))  # (fsynced)
            self.admitted, self.unsynced_at = False, None
            log.info("journal compacted", path=self.file.path, bytes=self.file.size)
        return written

    def sync(self, now_s: float) -> None:
        """fdatasync if a 202 waits on it, or the oldest unsynced record is ``LAZY_SYNC_S`` old."""
        at = self.unsynced_at
        if at is not None and (self.admitted or now_s - at >= LAZY_SYNC_S):
            self.file.sync()
            self.admitted, self.unsynced_at = False, None

    def close(self) -> None:
        self.commit(0.0)
        self.sync(float("inf"))
        self.file.close()
