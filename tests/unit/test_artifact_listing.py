"""The artifact ops the scheduler answers (orchd/artifacts.py ``answer``) on both stores: the
201 summary, GET's every field, listings filtered and owned, and a parent that must exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchd.artifacts import FsStore, MemoryStore, answer
from orchd.core.artifacts import canonical
from orchd.core.errors import Code, OrchdError


@pytest.fixture(params=["memory", "fs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> MemoryStore | FsStore:
    return MemoryStore() if request.param == "memory" else FsStore(str(tmp_path / "a"))


def put(store: MemoryStore | FsStore, owner: str, *args: object, parent: str | None = None) -> dict:
    doc = canonical(*args, parent=parent)  # type: ignore[arg-type]
    status, body = answer(store, "artifact.put", {"doc": doc, "parent": parent}, owner)
    assert status == 201
    return body  # type: ignore[no-any-return]


def test_put_get_list(store: MemoryStore | FsStore) -> None:
    root = put(store, "alice", "plan", {"s": 1}, ["x"])
    assert set(root) == {"id", "kind", "digest", "created_ms", "tags"}
    assert root["created_ms"] > 1_600_000_000_000 and root["tags"] == ["x"]
    kid = put(store, "alice", "diff", "+a", ["y"], parent=root["id"])
    put(store, "bob", "plan", {"s": 2})
    status, got = answer(store, "artifact.get", {"id": kid["id"]}, "alice")
    assert status == 200 and got["parent"] == root["id"] and got["content"] == "+a"

    def listed(**f: str) -> list[str]:
        return [a["id"] for a in answer(store, "artifact.list", f, "alice")[1]["artifacts"]]

    assert sorted(listed()) == sorted([root["id"], kid["id"]])  # bob's is not alice's
    assert listed(kind="plan") == [root["id"]]
    assert listed(tag="y") == [kid["id"]]
    assert listed(parent=root["id"]) == [kid["id"]]
    assert listed(kind="trace") == []
    assert answer(store, "artifact.list", {}, "carol")[1] == {"artifacts": []}


def test_get_of_another_owner_and_missing_parent(store: MemoryStore | FsStore) -> None:
    a = put(store, "alice", "other", 1)
    with pytest.raises(OrchdError) as ei:
        answer(store, "artifact.get", {"id": a["id"]}, "bob")
    assert ei.value.code is Code.NOT_FOUND
    with pytest.raises(OrchdError) as ei:
        put(store, "bob", "other", 2, parent=a["id"])  # alice's: not a parent bob may name
    assert ei.value.code is Code.INVALID_PARAMS and "parent" in ei.value.message


def test_created_ms_is_the_first_put(store: MemoryStore | FsStore) -> None:
    first = put(store, "alice", "other", 1)
    again = put(store, "bob", "other", 1)
    assert again["id"] == first["id"] and again["created_ms"] == first["created_ms"]
