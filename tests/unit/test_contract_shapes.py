"""The shapes the contract promises, on the pure parts: budget headers (int64, omitted when
unlimited), SSE `metrics`/`end`/`error` frames (integers, no nulls), the error envelope (no
nulls, every invalid field in one 400), artifacts (ids, views, filters, transcripts) and the
catalog's models (minimal bodies, warnings, trust)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from ipc import protocol as p
from ipc.frames import end_frame, error_frame, metrics_frame
from orchd.config import Limits
from orchd.core import artifacts as arts
from orchd.core.catalog import Catalog, sign
from orchd.core.errors import Code, OrchdError
from orchd.frontend.app import budget_headers
from orchd.frontend.schema import ModelBody, parse_body, parse_task
from tests.support.tasks import task_body

D1 = "sha256:" + "1" * 64


def data(frame: bytes) -> dict[str, Any]:
    line = next(x for x in frame.decode().split("\n") if x.startswith("data: "))
    out: dict[str, Any] = json.loads(line.removeprefix("data: "))
    return out


# ---------------------------------------------------------------- budgets and frames


def test_budget_headers_are_int64_and_omitted_when_unlimited() -> None:
    assert budget_headers(p.Budgets()) == {}
    h = budget_headers(p.Budgets(tokens=100, time_ms=2500, cost=1.25))
    assert h == {
        "X-Budget-Tokens-Remaining": "100",
        "X-Budget-Time-Remaining-Ms": "2500",
        "X-Budget-Cost-Remaining": "1.25",
    }
    assert budget_headers(p.Budgets(cost=0.0)) == {"X-Budget-Cost-Remaining": "0"}
    assert budget_headers(p.Budgets(cost=250.0)) == {"X-Budget-Cost-Remaining": "250"}
    assert "unlimited" not in str(budget_headers(p.Budgets(tokens=5)))


def test_metrics_frame_omits_unlimited_budgets_and_gives_integers() -> None:
    d = data(metrics_frame(3, 2, 0.5, True, (None, None, None)))
    assert d == {"queue_depth": 2, "on_time_probability": 0.5, "kv_warmth": True}
    d = data(metrics_frame(3, 0, 1.0, False, (7.0, 1234.567, 0.1234567)))
    assert d["tokens_budget_remaining"] == 7 and isinstance(d["tokens_budget_remaining"], int)
    assert d["time_budget_remaining_ms"] == 1234 and isinstance(d["time_budget_remaining_ms"], int)
    assert d["cost_budget_remaining"] == 0.123457


def test_end_frame_times_are_integers_and_no_null_artifact() -> None:
    d = data(end_frame(9, 12, 45.6, 30.2, "length"))
    assert d == {"tokens_out": 12, "decode_ms": 46, "decode_time_ms": 30, "reason": "length"}
    assert data(end_frame(9, 1, 1.0, 0.0, "stop", "sha256:" + "a" * 64))["artifact_id"]


def test_error_frame_and_envelope_have_no_nulls() -> None:
    e = OrchdError(Code.INTERNAL, "boom")
    assert e.envelope() == {"code": "INTERNAL", "message": "boom", "retriable": False}
    assert data(error_frame(2, e.envelope())) == e.envelope()
    e = OrchdError(Code.QUEUE_FULL_DROP_LRU, "full", engine="mock", retry_after_ms=50)
    env = e.envelope()
    assert env["engine"] == "mock" and env["retry_after_ms"] == 50 and None not in env.values()


# ---------------------------------------------------------------- validation


def test_every_invalid_task_field_in_one_error() -> None:
    body = task_body(ctx=0, priority="urgent", extra=1)
    del body["model_ref"]
    with pytest.raises(OrchdError) as ei:
        parse_task(json.dumps(body).encode(), Limits(), "k")
    env = ei.value.envelope()
    assert env["code"] == "INVALID_PARAMS" and env["engine"] == "mock"
    fields = sorted(x["field"] for x in env["errors"])
    assert fields == ["ctx", "extra", "model_ref", "priority"]
    assert all(x["field"] in env["message"] for x in env["errors"])


def test_limits_are_reported_with_the_rest() -> None:
    body = task_body(max_tokens=10**6, ctx=10**7)
    with pytest.raises(OrchdError) as ei:
        parse_task(json.dumps(body).encode(), Limits(), "k")
    assert sorted(x["field"] for x in ei.value.errors or []) == ["ctx", "max_tokens"]


@pytest.mark.parametrize("raw", [b"", b"[1]", b"{", b'"x"'])
def test_a_body_that_is_no_object_is_one_error(raw: bytes) -> None:
    with pytest.raises(OrchdError) as ei:
        parse_task(raw, Limits(), "k")
    assert ei.value.errors is not None and len(ei.value.errors) == 1
    assert "engine" not in ei.value.envelope()


def test_nested_fields_are_named_by_their_path() -> None:
    raw = json.dumps({"id": "m", "trust_policy": {"mode": "lax"}, "sbom": {}}).encode()
    with pytest.raises(OrchdError) as ei:
        parse_body(raw, ModelBody)
    fields = sorted(x["field"] for x in ei.value.errors or [])
    assert fields == ["sbom", "trust_policy.mode"]


# ---------------------------------------------------------------- artifacts


def test_optional_artifact_fields_are_content_addressed() -> None:
    plain = arts.canonical("plan", {"a": 1})
    assert plain == b'{"content":{"a":1},"kind":"plan"}'  # ids of old documents stay
    tagged = arts.canonical("plan", {"a": 1}, ["b", "a", "b"], None, {"x": 1})
    assert json.loads(tagged)["tags"] == ["a", "b"]
    assert arts.artifact_id(tagged) == arts.artifact_id(
        arts.canonical("plan", {"a": 1}, ["a", "b"], None, {"x": 1})
    )
    assert arts.artifact_id(tagged) != arts.artifact_id(plain)


def test_views_and_filters() -> None:
    aid = "sha256:" + "b" * 64
    doc = json.loads(arts.canonical("diff", "x", ["t1"], aid, {"by": "me"}))
    s = arts.summary("sha256:" + "c" * 64, doc, 5)
    assert s == {
        "id": "sha256:" + "c" * 64,
        "kind": "diff",
        "digest": "sha256:" + "c" * 64,
        "created_ms": 5,
        "tags": ["t1"],
        "parent": aid,
    }
    v = arts.view(s["id"], doc, 5)
    assert v["content"] == "x" and v["metadata"] == {"by": "me"}
    assert arts.matches(doc, "diff", "t1", aid) and arts.matches(doc, None, None, None)
    assert not arts.matches(doc, "plan", None, None)
    assert not arts.matches(doc, None, "t2", None)
    assert not arts.matches(doc, None, None, "sha256:" + "d" * 64)
    with pytest.raises(OrchdError):
        arts.check_kind("note")


def test_transcript_events_are_type_id_data() -> None:
    frames = [
        b'event: started\nid: 0\ndata: {"pool_id":"p"}\n\n',
        b'event: token\nid: 1\ndata: {"t":"a","i":0}\n\nevent: token\nid: 2\ndata: {"t":"b","i":1}\n\n',
        b'data: {"choices":[]}\n\ndata: [DONE]\n\n',
    ]
    assert arts.transcript_events(frames) == [
        {"type": "started", "id": 0, "data": {"pool_id": "p"}},
        {"type": "token", "id": 1, "data": {"t": "a", "i": 0}},
        {"type": "token", "id": 2, "data": {"t": "b", "i": 1}},
        {"type": "message", "data": {"choices": []}},
        {"type": "message", "data": "[DONE]"},
    ]


# ---------------------------------------------------------------- catalog models


def test_a_model_needs_only_id_and_digest() -> None:
    c = Catalog()
    m = c.register({"id": "m", "digest": D1}, 1.5)
    v = m.view()
    assert v["id"] == "m" and v["digest"] == D1 and v["created_ms"] == 1
    assert "ref" not in v and "source_url" not in v and None not in v.values()
    assert v["warnings"] == ["no signature", "no SBOM"]  # permissive: warned, admitted
    assert c.check("m") == "m"
    with pytest.raises(OrchdError) as ei:
        c.register({"id": "bare"}, 0)
    assert "digest" in ei.value.message


def test_source_url_and_ref_are_one_field() -> None:
    c = Catalog()
    v = c.register({"id": "a", "digest": D1, "source_url": "hf:o/r/f.gguf"}, 0).view()
    assert v["source_url"] == v["ref"] == "hf:o/r/f.gguf"
    assert c.resolve("hf:o/r/f.gguf") is c.get("a")
    with pytest.raises(OrchdError):
        c.register({"id": "b", "ref": "mock:a", "source_url": "mock:b"}, 0)


@pytest.mark.parametrize(
    "digest", ["sha256:dead", "SHA256:" + "1" * 64, "1" * 64, "sha256:xyz12345"]
)
def test_digest_is_algo_colon_lowercase_hex(digest: str) -> None:
    with pytest.raises(OrchdError):
        Catalog().register({"id": "m", "digest": digest}, 0)


def test_a_short_digest_is_kept_and_a_verification_finds_the_mismatch() -> None:
    c = Catalog()
    c.register({"id": "m", "digest": "sha256:deadbeef", "source_url": "file:/m.bin"}, 0)
    c.record_verification("m", D1, 1)
    with pytest.raises(OrchdError) as ei:
        c.check("m")
    assert ei.value.code is Code.UNTRUSTED_ARTIFACT


def test_permissive_warns_strict_policy_refuses_what_it_requires() -> None:
    c = Catalog()
    body = {"id": "m", "digest": D1, "source_url": "oci://reg.io/r:1"}
    sbom = {"uri": "https://x/sbom.json"}
    signed = {"signatures": [{"signer": "ops", "algo": "ed25519", "verified": True}]}
    m = c.register({**body, **signed, "sbom": sbom}, 0)
    assert m.warnings == []
    strict = {"mode": "strict", "require_sbom": True, "allowed_registries": ["reg.io"]}
    c.register({**body, "id": "s", "trust_policy": strict}, 0)
    with pytest.raises(OrchdError) as ei:
        c.check("s")
    assert ei.value.code is Code.UNTRUSTED_ARTIFACT and "SBOM" in ei.value.message
    other = {**strict, "require_sbom": False, "allowed_registries": ["elsewhere.io"]}
    c.register({**body, "id": "r", "trust_policy": other}, 0)
    with pytest.raises(OrchdError) as ei:
        c.check("r")
    assert "reg.io" in ei.value.message
    # A client's own `verified: true` is no signature orchd checked: strict still refuses.
    need = {"mode": "strict", "require_signature": True}
    c.register({**body, **signed, "id": "v", "sbom": sbom, "trust_policy": need}, 0)
    with pytest.raises(OrchdError):
        c.check("v")


def test_a_model_policy_cannot_loosen_a_strict_catalog() -> None:
    c = Catalog("strict", {"k": "s"})
    c.register({"id": "m", "digest": D1, "trust_policy": {"mode": "permissive"}}, 0)
    assert c.policy(c.get("m"))["mode"] == "strict"
    c.register({"id": "n", "digest": D1, "signature": sign(D1, "s"), "signing_key": "k"}, 0)
    assert c.check("n") == "n" and c.get("n").warnings == ["no SBOM"]


def test_digest_mismatch_fails_before_admission_under_any_policy() -> None:
    c = Catalog()
    c.register({"id": "m", "digest": D1, "source_url": "file:/m.bin"}, 0)
    c.record_verification("m", "sha256:" + "2" * 64, 1)
    with pytest.raises(OrchdError) as ei:
        c.check("m")
    assert ei.value.code is Code.UNTRUSTED_ARTIFACT and "mismatch" in ei.value.message
