"""Content addressing (orchd/core/artifacts.py) and the artifact stores (orchd/artifacts.py)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

import orchd.artifacts as store_mod
from orchd.artifacts import FsStore, MemoryStore, valid_id, write_atomic
from orchd.core.artifacts import artifact_id, canonical

ID = re.compile(r"^sha256:[0-9a-f]{64}$")


def doc(n: int, size: int = 0) -> bytes:
    return canonical("note", {"n": n, "pad": "x" * size})


# ---------------------------------------------------------------- canonical form and ids


def test_canonical_is_key_order_independent() -> None:
    a = canonical("trace", {"b": 1, "a": [1, 2], "c": {"y": 1, "x": 2}})
    b = canonical("trace", {"c": {"x": 2, "y": 1}, "a": [1, 2], "b": 1})
    assert a == b
    assert artifact_id(a) == artifact_id(b)
    # Compact, sorted, UTF-8.
    assert a == b'{"content":{"a":[1,2],"b":1,"c":{"x":2,"y":1}},"kind":"trace"}'
    assert canonical("t", {"s": "é"}) == '{"content":{"s":"é"},"kind":"t"}'.encode()


def test_canonical_distinguishes_kind_content_and_list_order() -> None:
    base = canonical("trace", {"a": [1, 2]})
    assert canonical("note", {"a": [1, 2]}) != base
    assert canonical("trace", {"a": [2, 1]}) != base
    assert canonical("trace", {"a": [1, 2, 3]}) != base


def test_artifact_id_form() -> None:
    aid = artifact_id(b"hello")
    assert ID.match(aid)
    assert aid == "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    assert valid_id(aid)
    for bad in ("sha256:abc", "md5:" + "0" * 64, "sha256:" + "G" * 64, "../etc/passwd", ""):
        assert not valid_id(bad)


# ---------------------------------------------------------------- MemoryStore


def test_memory_store_put_get() -> None:
    s = MemoryStore()
    d = doc(1)
    aid = s.put(d)
    assert aid == artifact_id(d) and ID.match(aid)
    assert s.get(aid) == d
    assert s.get(artifact_id(b"other")) is None
    assert s.get("nonsense") is None


def test_memory_store_same_content_same_id_stored_once() -> None:
    s = MemoryStore()
    a1 = s.put(canonical("k", {"x": 1, "y": 2}))
    a2 = s.put(canonical("k", {"y": 2, "x": 1}))
    assert a1 == a2
    assert s.bytes == len(canonical("k", {"x": 1, "y": 2}))
    assert len(s._docs) == 1


def test_memory_store_evicts_least_recently_used() -> None:
    docs = [doc(i, 100) for i in range(4)]
    size = len(docs[0])
    assert all(len(d) == size for d in docs)
    s = MemoryStore(max_bytes=3 * size)
    ids = [s.put(d) for d in docs[:3]]
    assert s.bytes == 3 * size
    assert s.get(ids[0]) == docs[0]  # touch 0: now 1 is the least recently used
    ids.append(s.put(docs[3]))
    assert s.bytes == 3 * size
    assert s.get(ids[1]) is None
    assert [s.get(i) is not None for i in (ids[0], ids[2], ids[3])] == [True, True, True]
    # Putting existing content counts as a use, too.
    s.put(docs[2])
    s.put(docs[1])
    assert s.get(ids[0]) is None
    assert s.get(ids[2]) is not None


def test_memory_store_keeps_a_document_larger_than_the_bound() -> None:
    s = MemoryStore(max_bytes=10)
    small = s.put(b"{}")
    big = s.put(doc(1, 100))
    assert s.get(big) is not None
    assert s.get(small) is None
    assert s.bytes == len(doc(1, 100))


# ---------------------------------------------------------------- FsStore


def listing(root: Path) -> list[str]:
    return sorted(os.listdir(root))


def test_fs_store_put_get(tmp_path: Path) -> None:
    root = tmp_path / "artifacts"
    s = FsStore(str(root))
    assert root.is_dir()
    d = doc(1)
    aid = s.put(d)
    assert aid == artifact_id(d)
    assert s.get(aid) == d
    assert listing(root) == [aid.replace(":", "-")]
    # A new store on the same directory (a restart) sees it.
    assert FsStore(str(root)).get(aid) == d


def test_fs_store_same_id_twice_writes_once(tmp_path: Path) -> None:
    s = FsStore(str(tmp_path))
    d = canonical("k", {"a": 1, "b": 2})
    aid = s.put(d)
    path = tmp_path / aid.replace(":", "-")
    before = path.stat()
    assert s.put(canonical("k", {"b": 2, "a": 1})) == aid
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert listing(tmp_path) == [aid.replace(":", "-")]


def test_fs_store_get_unknown_or_invalid(tmp_path: Path) -> None:
    s = FsStore(str(tmp_path / "a"))
    (tmp_path / "secret").write_bytes(b"x")
    assert s.get(artifact_id(b"never stored")) is None
    for bad in ("../secret", "sha256:../../secret", "sha256-" + "0" * 64, "", "sha256:xyz"):
        assert s.get(bad) is None


def test_fs_store_leaves_no_temp_files(tmp_path: Path) -> None:
    s = FsStore(str(tmp_path))
    ids = {s.put(doc(i)) for i in range(5)}
    assert listing(tmp_path) == sorted(a.replace(":", "-") for a in ids)
    assert not [n for n in listing(tmp_path) if n.startswith(".tmp")]


def test_fs_store_failed_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = FsStore(str(tmp_path))

    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store_mod.os, "fsync", boom)
    with pytest.raises(OSError):
        s.put(doc(1))
    monkeypatch.undo()
    assert listing(tmp_path) == []
    assert s.get(artifact_id(doc(1))) is None


# ---------------------------------------------------------------- write_atomic


def test_write_atomic_creates_and_replaces(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "index.json"
    write_atomic(str(path), b"one")
    assert path.read_bytes() == b"one"
    write_atomic(str(path), b"two, longer")
    assert path.read_bytes() == b"two, longer"
    write_atomic(str(path), b"")
    assert path.read_bytes() == b""
    assert listing(tmp_path / "sub") == ["index.json"]


def test_write_atomic_failure_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "index.json"
    write_atomic(str(path), b"old")

    def boom(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(store_mod.os, "fsync", boom)
    with pytest.raises(OSError):
        write_atomic(str(path), b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old"
    assert listing(tmp_path) == ["index.json"]
