"""Issue 13's pieces one by one, without processes: JSON depth, model-path confinement, the
bounded verifier, artifact owners, tenant ids at the edge."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from orchd.artifacts import FsStore, MemoryStore
from orchd.config import Catalog
from orchd.core.artifacts import canonical
from orchd.core.errors import Code, OrchdError
from orchd.frontend.http import MAX_JSON_DEPTH, json_depth_ok
from orchd.frontend.tenancy import local_error, scoped, unscoped
from orchd.scheduler import models
from orchd.scheduler.models import Job, Verifier, check_refs, confine
from tests.support.wait import wait_for

# ---------------------------------------------------------------- JSON depth


@pytest.mark.parametrize(
    ("body", "ok"),
    [
        (b"[" * 64 + b"]" * 64, True),
        (b"[" * 65 + b"]" * 65, False),
        (b'{"a":' * 65 + b"1" + b"}" * 65, False),
        (b'{"s": "' + b"[" * 1000 + b'"}', True),  # brackets in strings do not count
        (b'["\\"' + b"[" * 100 + b'"]', True),  # nor after an escaped quote
        (b"[]" * 100_000, True),  # many, but shallow
        (b"[" * 1_000_000, False),
    ],
)
def test_json_depth(body: bytes, ok: bool) -> None:
    assert MAX_JSON_DEPTH == 64
    assert json_depth_ok(body) is ok


# ---------------------------------------------------------------- confinement


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "models"
    r.mkdir()
    (r / "m.bin").write_bytes(b"weights")
    (r / "dir").mkdir()
    return r


def test_refs_under_a_root_resolve(root: Path) -> None:
    roots = [str(root)]
    assert confine(f"file:{root / 'm.bin'}", roots) == str(root / "m.bin")
    assert confine(f"file:{root / 'dir'}", roots) == str(root / "dir")  # a model directory
    (root / "link").symlink_to(root / "m.bin")  # a link that stays inside is fine
    assert confine(f"file:{root / 'link'}", roots) == str(root / "m.bin")


def test_refs_out_of_the_roots_or_special_are_refused_naming_only_the_ref(
    root: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("x")
    (root / "out").symlink_to(secret)
    os.mkfifo(root / "fifo")
    roots = [str(root)]
    for ref in (
        "file:/etc/passwd",
        "file:/dev/zero",
        "file:/proc/self/status",
        f"file:{root}/../secret",
        f"file:{root / 'out'}",
        f"file:{root / 'fifo'}",
        f"file:{root}-sibling/m.bin",  # a prefix of the root is not under it
    ):
        with pytest.raises(OrchdError) as e:
            confine(ref, roots)
        assert e.value.code is Code.INVALID_PARAMS and repr(ref) in e.value.message
        assert str(secret) not in e.value.message
    with pytest.raises(OrchdError, match="directory"):
        confine(f"file:{root / 'dir'}", roots, regular_only=True)


def test_reload_by_catalog_id_checks_the_ref_it_stands_for(root: Path) -> None:
    refs = {"evil": "file:/etc/hostname"}
    with pytest.raises(OrchdError, match="'evil' is outside"):
        check_refs("pool.reload", {"new_model_ref": "evil"}, [str(root)], lambda r: refs.get(r, r))
    check_refs("pool.reload", {"new_model_ref": "mock:tiny"}, [str(root)], lambda r: r)


# ---------------------------------------------------------------- the verifier


def verifier(root: Path, **over: int) -> Verifier:
    cfg = Catalog(
        verify_max_bytes=over.get("max_bytes", 1 << 20),
        verify_timeout_ms=over.get("timeout_ms", 60_000),
        verify_concurrency=over.get("concurrency", 2),
    )
    return Verifier(cfg, [str(root)])


def test_a_digest_is_bounded_in_bytes(root: Path) -> None:
    v = verifier(root, max_bytes=4)
    with pytest.raises(OrchdError, match="verify_max_bytes=4"):
        v.digest(Job("m", f"file:{root / 'm.bin'}"))
    ok = verifier(root).digest(Job("m", f"file:{root / 'm.bin'}"))
    assert ok == "sha256:" + hashlib.sha256(b"weights").hexdigest()


def test_a_digest_is_bounded_in_time_and_can_be_canceled(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (root / "big.bin").write_bytes(b"x" * (3 << 20))
    ref = f"file:{root / 'big.bin'}"
    job = Job("m", ref)
    job.cancel.set()
    with pytest.raises(OrchdError, match="canceled"):
        verifier(root).digest(job)
    clock = iter(range(0, 10_000, 1))  # a second passes at every look at the clock
    monkeypatch.setattr(models.time, "monotonic", lambda: float(next(clock)))
    with pytest.raises(OrchdError, match="verify_timeout_ms=1500"):
        verifier(root, timeout_ms=1500, max_bytes=8 << 20).digest(Job("m", ref))


def test_at_most_n_verifications_run_at_once(root: Path) -> None:
    v = verifier(root, concurrency=1)
    gate = threading.Event()
    v._run = lambda job: gate.wait(10)  # type: ignore[method-assign]
    v.start("a", f"file:{root / 'm.bin'}")
    with pytest.raises(OrchdError) as e:
        v.check_room("b")
    assert e.value.status == 429 and "verify_concurrency" in e.value.message
    v.check_room("a")  # the same model again replaces its own run
    v.cancel("a")
    v.check_room("b")
    gate.set()


def test_a_canceled_verification_reports_nothing(root: Path) -> None:
    v = verifier(root)
    v.start("a", f"file:{root / 'm.bin'}")
    v.cancel("a")
    v.start("b", f"file:{root / 'm.bin'}")
    got: list[tuple[str, str | None, str]] = []

    def collected() -> bool:
        got.extend(v.done())
        return any(m == "b" for m, _, _ in got)

    wait_for(collected, 10, "model b's verification")
    assert [m for m, _, _ in got] == ["b"]


# ---------------------------------------------------------------- artifact owners


@pytest.mark.parametrize("kind", ["memory", "fs"])
def test_an_artifact_is_shown_to_its_owners_only(kind: str, tmp_path: Path) -> None:
    store = MemoryStore() if kind == "memory" else FsStore(str(tmp_path / "a"))
    doc = canonical("note", {"x": 1})
    aid = store.put(doc, "alice")
    assert store.get(aid, "alice") == doc
    assert store.get(aid, "bob") is None
    assert store.put(doc, "bob") == aid  # bob has the content: now his too
    assert store.get(aid, "bob") == doc and store.get(aid, "alice") == doc
    assert store.get(aid, "") is None  # a transcript of no known task: nobody's


def test_an_evicted_artifact_takes_its_owners_along() -> None:
    store = MemoryStore(max_bytes=64)
    first = store.put(canonical("n", "a" * 40), "alice")
    store.put(canonical("n", "b" * 40), "alice")
    assert store.get(first, "alice") is None and first not in store._owners


# ---------------------------------------------------------------- tenant ids


def test_tenant_ids_round_trip_and_errors_speak_the_clients_ids() -> None:
    kid = "0123456789ab"
    assert scoped(kid, "t-0") == "0123456789ab/t-0" and unscoped(scoped(kid, "t-0")) == "t-0"
    e = local_error(OrchdError(Code.NOT_FOUND, f"no task {scoped(kid, 't-0')!r}"), kid)
    assert e.message == "no task 't-0'"
