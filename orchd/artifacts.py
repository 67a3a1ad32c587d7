"""Artifact stores behind one interface: in memory (bounded) or on the filesystem (crash-safe).

Documents are canonical JSON bytes (``orchd.core.artifacts.canonical``) addressed by their
sha256; putting the same content twice yields the same id and stores it once.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections import OrderedDict
from typing import Protocol

from orchd.core.artifacts import artifact_id

_ID = re.compile(r"^sha256:[0-9a-f]{64}$")


def valid_id(aid: str) -> bool:
    return bool(_ID.match(aid))


class ArtifactStore(Protocol):
    def put(self, doc: bytes) -> str: ...

    def get(self, aid: str) -> bytes | None: ...


class MemoryStore:
    """Keeps at most ``max_bytes`` of documents; the least recently used go first."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._docs: OrderedDict[str, bytes] = OrderedDict()

    def put(self, doc: bytes) -> str:
        aid = artifact_id(doc)
        if aid in self._docs:
            self._docs.move_to_end(aid)
            return aid
        self._docs[aid] = doc
        self.bytes += len(doc)
        while self.bytes > self.max_bytes and len(self._docs) > 1:
            _, old = self._docs.popitem(last=False)
            self.bytes -= len(old)
        return aid

    def get(self, aid: str) -> bytes | None:
        doc = self._docs.get(aid)
        if doc is not None:
            self._docs.move_to_end(aid)
        return doc


class FsStore:
    """One file per artifact, written by :func:`write_atomic` (temp file, fsync, rename,
    directory fsync), so a crash leaves either the whole document or nothing."""

    def __init__(self, root: str) -> None:
        self.root = root
        os.makedirs(root, mode=0o700, exist_ok=True)

    def _path(self, aid: str) -> str:
        return os.path.join(self.root, aid.replace(":", "-"))

    def put(self, doc: bytes) -> str:
        aid = artifact_id(doc)
        path = self._path(aid)
        if os.path.exists(path):
            return aid
        write_atomic(path, doc)
        return aid

    def get(self, aid: str) -> bytes | None:
        if not valid_id(aid):
            return None
        try:
            with open(self._path(aid), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None


def write_atomic(path: str, data: bytes) -> None:
    """Replace ``path`` with ``data`` crash-safely: temp file, fsync, rename, directory fsync
    (artifacts and the catalog index both go through here)."""
    d = os.path.dirname(path) or "."
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    dfd = os.open(d, os.O_RDONLY)  # the rename itself survives a crash only once synced
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
