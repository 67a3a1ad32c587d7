"""The model catalog and the trust policy, artifacts and transcripts, through the daemon."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from orchd.core.catalog import sign
from tests.integration.conftest import run_task, submit
from tests.support.daemon import Daemon
from tests.support.sse import sync_request
from tests.support.wait import wait_for


def call(d: Daemon, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    status, _, raw = sync_request(d.host, d.port, method, path, d.headers, body)
    return status, json.loads(raw) if raw else None


def model_file(tmp: Path, name: str, data: bytes) -> tuple[str, str]:
    f = tmp / name
    f.write_bytes(data)
    return f"file:{f}", "sha256:" + hashlib.sha256(data).hexdigest()


def models_dir(d: Daemon) -> Path:
    """The default model root: file: refs resolve only under <run_dir>/models."""
    root = Path(d.run_dir) / "models"
    root.mkdir(exist_ok=True)
    return root


def wait_verified(d: Daemon, mid: str) -> dict[str, Any]:
    def verified() -> bool:
        return call(d, "GET", f"/v1/catalog/models/{mid}")[1].get("last_verified_ms") is not None

    wait_for(verified, 10, f"model {mid} to be verified")
    return call(d, "GET", f"/v1/catalog/models/{mid}")[1]  # type: ignore[no-any-return]


def test_catalog_lifecycle_and_admission_checks(daemon: Daemon) -> None:
    ref, digest = model_file(models_dir(daemon), "good.bin", b"good weights")
    status, m = call(
        daemon, "POST", "/v1/catalog/models", {"id": "good", "ref": ref, "digest": digest}
    )
    assert status == 201 and m["state"] == "Active" and "verified" not in m  # never null
    status, _ = call(daemon, "POST", "/v1/catalog/models/good/verify")
    assert status == 202
    m = wait_verified(daemon, "good")
    assert m["verified"] is True and m["actual_digest"] == digest and m["last_verified_ms"] > 1e12

    # A digest that does not match the file fails before admission.
    bad_ref, _ = model_file(models_dir(daemon), "tampered.bin", b"tampered weights")
    status, _ = call(
        daemon, "POST", "/v1/catalog/models", {"id": "tampered", "ref": bad_ref, "digest": digest}
    )
    assert status == 201
    call(daemon, "POST", "/v1/catalog/models/tampered/verify")
    assert wait_verified(daemon, "tampered")["verified"] is False
    status, body, _ = submit(daemon, model_ref="tampered")
    assert (
        status == 400
        and body["code"] == "UNTRUSTED_ARTIFACT"
        and "digest mismatch" in body["message"]
    )

    # A retired model is refused with MODEL_DEPRECATED.
    status, m = call(daemon, "POST", "/v1/catalog/models/good/state", {"state": "Retired"})
    assert status == 202 and m["state"] == "Retired"
    status, body, _ = submit(daemon, model_ref="good")
    assert status == 403 and body["code"] == "MODEL_DEPRECATED"
    status, body = call(daemon, "POST", "/v1/catalog/models/good/state", {"state": "Gone"})
    assert status == 400

    status, _ = call(daemon, "DELETE", "/v1/catalog/models/good")
    assert status == 204
    assert call(daemon, "GET", "/v1/catalog/models/good")[0] == 404


def test_model_refs_are_parsed_with_clear_errors(daemon: Daemon) -> None:
    good = [
        "hf:meta-llama/Llama-3-8B@main",
        "https://models.example/m.gguf",
        "s3://bucket-1/m.bin",
        "oci://registry.example/models/llama:v1",
        "hf:org/repo/path/to/file.gguf",
        "llama",
        "registry.example.com/llama3:8b",
    ]  # fmt: skip  (relative paths: read when verified)
    for i, ref in enumerate(good):
        assert call(daemon, "POST", "/v1/catalog/models", {"id": f"ref-{i}", "ref": ref})[0] == 201
    for ref, hint in [("../llama", "'..'"), ("file:relative/x", "absolute"), ("hf:nope", "hf:<org>"),
                      ("ftp://x/y", "unknown scheme"), ("http://x/y", "plain http")]:  # fmt: skip
        status, body = call(daemon, "POST", "/v1/catalog/models", {"id": "bad", "ref": ref})
        assert status == 400 and hint in body["message"], (ref, body)


def test_artifacts_are_content_addressed(daemon: Daemon) -> None:
    doc = {"kind": "plan", "content": {"b": [1, 2], "a": "x"}}
    status, first = call(daemon, "POST", "/v1/artifacts", doc)
    assert status == 201 and first["id"].startswith("sha256:")
    reordered = {"content": {"a": "x", "b": [1, 2]}, "kind": "plan"}
    assert call(daemon, "POST", "/v1/artifacts", reordered)[1]["id"] == first["id"]
    status, got = call(daemon, "GET", f"/v1/artifacts/{first['id']}")
    assert status == 200 and got["content"] == doc["content"] and got["kind"] == "plan"
    assert call(daemon, "GET", "/v1/artifacts/sha256:" + "0" * 64)[0] == 404
    assert call(daemon, "POST", "/v1/artifacts", {"kind": "Bad Kind", "content": 1})[0] == 400


def test_every_stream_leaves_its_transcript(daemon: Daemon) -> None:
    s = run_task(daemon, max_tokens=12)
    end = s.events[-1].json
    # The supervisor hands the transcript to the store as the stream ends, on another line
    # than the client's: it is there within moments, not necessarily before the client asks.
    got: list[tuple[int, dict]] = []
    wait_for(
        lambda: (
            got.append(call(daemon, "GET", f"/v1/artifacts/{end['artifact_id']}"))
            or got[-1][0] == 200
        ),
        10,
        "the transcript in the store",
    )
    status, art = got[-1]
    assert status == 200 and art["kind"] == "trace"
    t = art["content"]
    assert t["task_id"] and t["tokens_out"] == 12 and t["reason"] == "length"
    sent = [{"type": e.event, "id": int(e.id), "data": e.json} for e in s.events]
    sent[-1]["data"].pop("artifact_id")  # the transcript's own id is not in it
    assert t["events"] == sent  # every event as {type, id, data}, the terminal included


STRICT = """
[catalog]
trust_policy = "strict"
catalog_dir = "{dir}"
signing_keys = {{ops = "s3cret"}}
model_roots = ["{root}"]

[[pools]]
id = "signed"
model_ref = "{ref}"

[[replicas]]
id = "s0"
pool_id = "signed"
model_ref = "{ref}"
"""


def test_strict_trust_and_catalog_survives_restart(tmp_path: Path) -> None:
    ref, digest = model_file(tmp_path, "signed.bin", b"signed weights")
    cfg = STRICT.format(dir=tmp_path / "catalog", ref=ref, root=tmp_path)
    d = Daemon(tmp_path, cfg).start()
    try:
        # Uncatalogued: refused under strict trust.
        status, body, _ = submit(d, model_ref=ref)
        assert status == 400 and body["code"] == "UNTRUSTED_ARTIFACT"
        unsigned = {"id": "unsigned", "ref": ref, "digest": digest}
        assert call(d, "POST", "/v1/catalog/models", unsigned)[0] == 201
        status, body, _ = submit(d, model_ref="unsigned")
        assert status == 400 and "not signed" in body["message"]
        forged = {
            "id": "forged",
            "ref": ref,
            "digest": digest,
            "signature": "00" * 32,
            "signing_key": "ops",
        }
        assert call(d, "POST", "/v1/catalog/models", forged)[0] == 201
        assert submit(d, model_ref="forged")[1]["code"] == "UNTRUSTED_ARTIFACT"
        call(d, "DELETE", "/v1/catalog/models/unsigned")
        call(d, "DELETE", "/v1/catalog/models/forged")
        signed = {"id": "signed-model", "ref": ref, "digest": digest,
                  "signature": sign(digest, "s3cret"), "signing_key": "ops"}  # fmt: skip
        assert call(d, "POST", "/v1/catalog/models", signed)[0] == 201
        s = run_task(d, model_ref="signed-model", max_tokens=5)
        assert s.events[-1].event == "end" and s.events[0].json["pool_id"] == "signed"
        status, body = call(d, "POST", "/v1/pools/signed/reload", {"new_model_ref": "mock:tiny"})
        assert status == 409 and "not in the catalog" in body["message"]
    finally:
        assert d.stop() == 0
    again = Daemon(tmp_path, cfg).start()
    try:
        status, m = call(again, "GET", "/v1/catalog/models/signed-model")
        assert status == 200 and m["digest"] == digest
        assert run_task(again, model_ref="signed-model", max_tokens=3).events[-1].event == "end"
    finally:
        assert again.stop() == 0
