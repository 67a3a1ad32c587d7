"""The model catalog (orchd/core/catalog.py): refs, digests, signatures, lifecycle, trust."""

from __future__ import annotations

import copy

import msgspec
import pytest

from orchd.core.catalog import Catalog, Model, sign
from orchd.core.errors import Code, OrchdError

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
SECRET = "s3cr3t"


def refused(fn, *args) -> OrchdError:
    with pytest.raises(OrchdError) as ei:
        fn(*args)
    return ei.value


# ---------------------------------------------------------------- registry


def test_register_get_delete() -> None:
    c = Catalog()
    m = c.register({"id": "m1", "ref": "hf:org/name", "digest": D1}, 123.0)
    assert isinstance(m, Model)
    assert (m.id, m.ref, m.digest, m.state, m.created_ms) == (
        "m1",
        "hf:org/name",
        D1,
        "Active",
        123,
    )
    assert (m.verified, m.last_verified_ms, m.signature) == (None, None, None)
    assert c.get("m1") is m
    v = m.view()
    assert v["id"] == "m1" and v["state"] == "Active" and v["digest"] == D1
    c.delete("m1")
    e = refused(c.get, "m1")
    assert e.code is Code.NOT_FOUND and "m1" in e.message
    assert refused(c.delete, "m1").code is Code.NOT_FOUND


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"ref": "mock:a"}, "id"),
        ({"id": "", "ref": "mock:a"}, "id"),
        ({"id": "has space", "ref": "mock:a"}, "id"),
        ({"id": "x" * 129, "ref": "mock:a"}, "id"),
        ({"id": 5, "ref": "mock:a"}, "id"),
        ({"id": "m"}, "ref"),
        ({"id": "m", "ref": 7}, "ref"),
        ({"id": "m", "ref": "mock:a", "digest": "md5:abc"}, "digest"),
        ({"id": "m", "ref": "mock:a", "digest": "sha256:" + "A" * 64}, "digest"),
        ({"id": "m", "ref": "mock:a", "signature": "ab"}, "signature"),
    ],
)
def test_register_validates_each_field(body: dict, field: str) -> None:
    c = Catalog()
    e = refused(c.register, body, 0)
    assert e.code is Code.INVALID_PARAMS
    assert e.message.startswith(field), e.message
    assert c.models == {}


def test_register_rejects_bad_ref_and_duplicate_id() -> None:
    c = Catalog()
    e = refused(c.register, {"id": "m", "ref": "http://x/y"}, 0)
    assert e.code is Code.INVALID_PARAMS
    c.register({"id": "m", "ref": "mock:a"}, 0)
    e = refused(c.register, {"id": "m", "ref": "mock:b"}, 1)
    assert e.code is Code.INVALID_PARAMS and "already" in e.message
    assert c.get("m").ref == "mock:a"


def test_set_state() -> None:
    c = Catalog()
    c.register({"id": "m", "ref": "mock:a"}, 0)
    assert c.set_state("m", "Retired").state == "Retired"
    assert c.set_state("m", "Active").state == "Active"
    e = refused(c.set_state, "m", "Deleted")
    assert e.code is Code.INVALID_PARAMS and "Active" in e.message and "Retired" in e.message
    assert refused(c.set_state, "m", None).code is Code.INVALID_PARAMS
    assert c.get("m").state == "Active"
    assert refused(c.set_state, "nope", "Active").code is Code.NOT_FOUND


# ---------------------------------------------------------------- verification


def test_record_verification_match() -> None:
    c = Catalog()
    c.register({"id": "m", "ref": "file:/m.bin", "digest": D1}, 0)
    m = c.record_verification("m", D1, 500)
    assert (m.verified, m.actual_digest, m.last_verified_ms, m.verify_error) == (
        True,
        D1,
        500,
        None,
    )
    assert c.verifications == 1


def test_record_verification_mismatch() -> None:
    c = Catalog()
    c.register({"id": "m", "ref": "file:/m.bin", "digest": D1}, 0)
    m = c.record_verification("m", D2, 600)
    assert (m.verified, m.digest, m.actual_digest, m.last_verified_ms) == (False, D1, D2, 600)


def test_record_verification_unreadable() -> None:
    c = Catalog()
    c.register({"id": "m", "ref": "file:/m.bin", "digest": D1}, 0)
    m = c.record_verification("m", None, 700, "No such file or directory")
    assert m.verified is None
    assert m.verify_error == "No such file or directory"
    assert m.last_verified_ms == 700
    assert m.digest == D1
    assert c.check("m") == "file:/m.bin"  # could not look: not refused on that account


def test_first_verification_pins_a_missing_digest() -> None:
    c = Catalog()
    c.register({"id": "m", "ref": "file:/m.bin"}, 0)
    m = c.record_verification("m", D1, 1)
    assert (m.verified, m.digest) == (True, D1)
    # The file changes: the next verification is a mismatch against the pinned digest.
    m = c.record_verification("m", D2, 2)
    assert (m.verified, m.digest, m.actual_digest) == (False, D1, D2)
    assert c.verifications == 2
    assert refused(c.record_verification, "ghost", D1, 3).code is Code.NOT_FOUND


# ---------------------------------------------------------------- check and trust


def strict_catalog() -> Catalog:
    return Catalog("strict", {"k1": SECRET})


def test_check_retired_is_model_deprecated() -> None:
    for policy in ("permissive", "strict"):
        c = Catalog(policy, {"k1": SECRET})
        c.register(
            {
                "id": "m",
                "ref": "mock:a",
                "digest": D1,
                "signature": sign(D1, SECRET),
                "signing_key": "k1",
            },
            0,
        )
        c.set_state("m", "Retired")
        e = refused(c.check, "m")
        assert e.code is Code.MODEL_DEPRECATED and e.status == 403
        assert refused(c.check, "mock:a").code is Code.MODEL_DEPRECATED


def test_check_digest_mismatch_is_untrusted() -> None:
    c = Catalog()
    c.register({"id": "m", "ref": "mock:a", "digest": D1}, 0)
    c.record_verification("m", D2, 1)
    e = refused(c.check, "mock:a")
    assert e.code is Code.UNTRUSTED_ARTIFACT
    assert D1 in e.message and D2 in e.message
    # Verified again and matching: trusted again.
    c.record_verification("m", D1, 2)
    assert c.check("mock:a") == "mock:a"


def test_strict_refuses_unsigned() -> None:
    c = strict_catalog()
    c.register({"id": "m", "ref": "mock:a", "digest": D1}, 0)
    e = refused(c.check, "m")
    assert e.code is Code.UNTRUSTED_ARTIFACT and "not signed" in e.message


def test_strict_admits_properly_signed() -> None:
    c = strict_catalog()
    c.register(
        {
            "id": "m",
            "ref": "mock:a",
            "digest": D1,
            "signature": sign(D1, SECRET),
            "signing_key": "k1",
        },
        0,
    )
    assert c.signed(c.get("m"))
    assert c.check("m") == "mock:a"
    assert c.check("mock:a") == "mock:a"


@pytest.mark.parametrize(
    "body",
    [
        {"signature": sign(D1, "wrong secret"), "signing_key": "k1"},
        {"signature": sign(D2, SECRET), "signing_key": "k1"},  # signs another digest
        {"signature": sign(D1, SECRET), "signing_key": "unknown-key"},
        {"signature": "00" * 32, "signing_key": "k1"},
    ],
)
def test_strict_refuses_wrong_signature(body: dict) -> None:
    c = strict_catalog()
    c.register({"id": "m", "ref": "mock:a", "digest": D1, **body}, 0)
    assert not c.signed(c.get("m"))
    assert refused(c.check, "m").code is Code.UNTRUSTED_ARTIFACT


def test_signature_without_a_digest_is_unsigned_until_verified() -> None:
    c = strict_catalog()
    c.register({"id": "m", "ref": "mock:a", "signature": sign(D1, SECRET), "signing_key": "k1"}, 0)
    assert refused(c.check, "m").code is Code.UNTRUSTED_ARTIFACT
    c.record_verification("m", D1, 1)  # pins D1, which the signature covers
    assert c.check("m") == "mock:a"


def test_strict_refuses_uncatalogued() -> None:
    c = strict_catalog()
    e = refused(c.check, "hf:org/name")
    assert e.code is Code.UNTRUSTED_ARTIFACT
    assert "not in the catalog" in e.message


def test_permissive_passes_uncatalogued_and_unsigned_through() -> None:
    c = Catalog()
    assert c.check("hf:org/name") == "hf:org/name"
    c.register({"id": "m", "ref": "mock:a"}, 0)
    assert c.check("m") == "mock:a"


# ---------------------------------------------------------------- resolve and persistence


def test_resolve_by_id_or_ref() -> None:
    c = Catalog()
    m1 = c.register({"id": "m1", "ref": "mock:a"}, 0)
    m2 = c.register({"id": "m2", "ref": "hf:org/name@v2"}, 0)
    assert c.resolve("m1") is m1
    assert c.resolve("mock:a") is m1
    assert c.resolve("hf:org/name@v2") is m2
    assert c.resolve("hf:org/name") is None
    assert c.resolve("m3") is None
    assert c.check("m2") == "hf:org/name@v2"  # the canonical ref


def test_snapshot_restore_round_trip() -> None:
    c = Catalog("strict", {"k1": SECRET})
    c.register(
        {
            "id": "m1",
            "ref": "mock:a",
            "digest": D1,
            "signature": sign(D1, SECRET),
            "signing_key": "k1",
        },
        10,
    )
    c.register({"id": "m2", "ref": "file:/m2.bin"}, 20)
    c.record_verification("m2", D2, 30)
    c.register({"id": "m3", "ref": "hf:org/x"}, 40)
    c.set_state("m3", "Retired")
    snap = c.snapshot()
    assert snap["version"] == 1
    # It goes to disk as JSON: survive that trip too.
    snap = msgspec.json.decode(msgspec.json.encode(snap))

    d = Catalog("strict", {"k1": SECRET})
    d.restore(copy.deepcopy(snap))
    assert {mid: m.view() for mid, m in d.models.items()} == {
        mid: m.view() for mid, m in c.models.items()
    }
    assert list(d.models) == ["m1", "m2", "m3"]
    assert d.check("m1") == "mock:a"
    assert refused(d.check, "m3").code is Code.MODEL_DEPRECATED
    assert d.get("m2").verified is True and d.get("m2").digest == D2
    # Restoring replaces, not merges.
    d.restore({"version": 1, "models": []})
    assert d.models == {}
