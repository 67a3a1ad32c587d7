"""Artifact stores behind one interface: in memory (bounded) or on the filesystem (crash-safe).

Documents are canonical JSON bytes (``orchd.core.artifacts.canonical``) addressed by their
sha256; putting the same content twice yields the same id and stores it once.

Each document also has owners: the API key ids that put it (a transcript's owner is the key
of its task). ``get`` with an owner returns the document only to one of them, so an id tells
another key nothing, not even that it exists. ``None`` skips the check (internal use).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from collections import OrderedDict
from typing import Any, Protocol

import msgspec

from orchd.core import artifacts as arts
from orchd.core.artifacts import artifact_id
from orchd.core.errors import Code, OrchdError

_ID = re.compile(r"^sha256:[0-9a-f]{64}$")


def valid_id(aid: str) -> bool:
    return bool(_ID.match(aid))


class ArtifactStore(Protocol):
    def put(self, doc: bytes, owner: str | None = None) -> str: ...

    def get(self, aid: str, owner: str | None = None) -> bytes | None: ...

    def created_ms(self, aid: str) -> int: ...

    def owned(self, owner: str) -> list[str]: ...


class MemoryStore:
    """Keeps at most ``max_bytes`` of documents; the least recently used go first."""

    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._docs: OrderedDict[str, bytes] = OrderedDict()
        self._owners: dict[str, set[str]] = {}
        self._created: dict[str, int] = {}  # wall-clock ms of the first put

    def put(self, doc: bytes, owner: str | None = None) -> str:
        aid = artifact_id(doc)
        if owner is not None:
            self._owners.setdefault(aid, set()).add(owner)
        if aid in self._docs:
            self._docs.move_to_end(aid)
            return aid
        self._docs[aid] = doc
        self._created[aid] = int(time.time() * 1000)
        self.bytes += len(doc)
        while self.bytes > self.max_bytes and len(self._docs) > 1:
            gone, old = self._docs.popitem(last=False)
            self._owners.pop(gone, None)
            self._created.pop(gone, None)
            self.bytes -= len(old)
        return aid

    def created_ms(self, aid: str) -> int:
        return self._created.get(aid, 0)

    def owned(self, owner: str) -> list[str]:
        return [a for a, who in self._owners.items() if owner in who and a in self._docs]

    def get(self, aid: str, owner: str | None = None) -> bytes | None:
        if owner is not None and owner not in self._owners.get(aid, ()):
            return None
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

    def _owners(self, aid: str) -> set[str]:
        try:
            with open(self._path(aid) + ".owners", encoding="ascii") as f:
                return set(f.read().split())
        except FileNotFoundError:
            return set()

    def put(self, doc: bytes, owner: str | None = None) -> str:
        aid = artifact_id(doc)
        path = self._path(aid)
        if owner is not None:
            owners = self._owners(aid)
            if owner not in owners:
                write_atomic(path + ".owners", "\n".join(sorted(owners | {owner})).encode())
        if os.path.exists(path):
            return aid
        write_atomic(path, doc)
        return aid

    def get(self, aid: str, owner: str | None = None) -> bytes | None:
        if not valid_id(aid):
            return None
        if owner is not None and owner not in self._owners(aid):
            return None
        try:
            with open(self._path(aid), "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    def created_ms(self, aid: str) -> int:
        """When the document was written (it never is again: its name is its hash)."""
        try:
            return os.stat(self._path(aid)).st_mtime_ns // 1_000_000
        except FileNotFoundError:
            return 0

    def owned(self, owner: str) -> list[str]:
        out = []
        with os.scandir(self.root) as it:
            for e in it:
                if e.name.endswith(".owners") and e.name.startswith("sha256-"):
                    aid = e.name.removesuffix(".owners").replace("-", ":", 1)
                    if owner in self._owners(aid) and os.path.exists(self._path(aid)):
                        out.append(aid)
        return out


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


def answer(store: ArtifactStore, op: str, args: dict[str, Any], owner: str) -> tuple[int, Any]:
    """The scheduler's artifact ops (``artifact.put|get|list``) on ``store`` for ``owner``:
    ``(status, body)``, or the typed error why not."""
    if op == "artifact.put":
        parent = args.get("parent")
        if parent is not None and store.get(parent, owner) is None:
            raise OrchdError(
                Code.INVALID_PARAMS, f"parent: no artifact {parent!r} of yours", param="parent"
            )
        aid = store.put(args["doc"], owner)
        return 201, arts.summary(aid, msgspec.json.decode(args["doc"]), store.created_ms(aid))
    if op == "artifact.get":
        doc = store.get(args["id"], owner)
        if doc is None:
            raise OrchdError(Code.NOT_FOUND, f"no artifact {args['id']!r}")
        return 200, arts.view(args["id"], msgspec.json.decode(doc), store.created_ms(args["id"]))
    if op == "artifact.list":
        found = []
        for aid in store.owned(owner):
            raw = store.get(aid, owner)
            if raw is None:
                continue
            doc = msgspec.json.decode(raw)
            if arts.matches(doc, args.get("kind"), args.get("tag"), args.get("parent")):
                found.append(arts.summary(aid, doc, store.created_ms(aid)))
        found.sort(key=lambda a: (-a["created_ms"], a["id"]))
        return 200, {"artifacts": found[: arts.MAX_LIST]}
    raise OrchdError(Code.INVALID_PARAMS, f"unknown operation {op!r}")
