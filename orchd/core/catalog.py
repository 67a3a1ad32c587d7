"""The model catalog: references, digests, signatures, lifecycle and the trust policy.

Pure: the shell computes file digests (``verify``) and persists ``snapshot()``; this module
decides. Model references:

    hf:<org>/<name>[@<revision>]     file:/<absolute path>     https://<host>/<path>
    s3://<bucket>/<key>              oci://<registry>/<repo>[:<tag>|@sha256:<hex>]
    mock:<name>                      random:<name>  (random weights, built-in torch engine)

A model is *signed* when it carries a signature that is the HMAC-SHA256 of its digest under
one of the configured signing keys. Trust policy ``strict`` admits only catalogued, signed
models whose digest, where verified, matched; ``permissive`` admits uncatalogued refs too.
A digest mismatch and a Retired model are refused under either policy.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import asdict, dataclass
from typing import Any

from orchd.core.errors import Code, OrchdError

STATES = ("Active", "Retired")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_HF = re.compile(r"^hf:[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
_OCI = re.compile(r"^oci://[\w.\-]+(:\d+)?/[\w.\-/]+(:[\w.\-]+|@sha256:[0-9a-f]{64})?$")
_S3 = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]/.+$")
_HTTPS = re.compile(r"^https://[\w.\-]+(:\d+)?/.+$")
_MOCK = re.compile(r"^mock:[\w.\-]+$")
_RANDOM = re.compile(r"^random:[\w.\-]+$")


def parse_ref(ref: str) -> tuple[str, str]:
    """``(scheme, rest)`` of a model reference, or INVALID_PARAMS saying what is wrong."""
    scheme, sep, rest = ref.partition(":")
    if not sep:
        raise OrchdError(Code.INVALID_PARAMS, f"model ref {ref!r} has no scheme (hf:, file:, ...)")
    checks = {
        "hf": (_HF, "hf:<org>/<name>[@<revision>]"),
        "s3": (_S3, "s3://<bucket>/<key>"),
        "https": (_HTTPS, "https://<host>/<path>"),
        "oci": (_OCI, "oci://<registry>/<repo>[:<tag>|@sha256:<hex>]"),
        "mock": (_MOCK, "mock:<name>"),
        "random": (_RANDOM, "random:<name>"),
    }
    if scheme == "file":
        if not rest.startswith("/") or "\0" in rest:
            raise OrchdError(
                Code.INVALID_PARAMS, f"model ref {ref!r}: file: needs an absolute path"
            )
        return scheme, rest
    if scheme == "http":
        raise OrchdError(
            Code.INVALID_PARAMS,
            f"model ref {ref!r}: plain http is not allowed; use https://<host>/<path>",
        )
    if scheme not in checks:
        raise OrchdError(
            Code.INVALID_PARAMS,
            f"model ref {ref!r}: unknown scheme {scheme!r} (hf, file, https, s3, oci, mock, random)",
        )
    pattern, form = checks[scheme]
    if not pattern.match(ref):
        raise OrchdError(Code.INVALID_PARAMS, f"model ref {ref!r} is malformed: expected {form}")
    return scheme, rest


def sign(digest: str, secret: str) -> str:
    return hmac.new(secret.encode(), digest.encode(), hashlib.sha256).hexdigest()


@dataclass(slots=True)
class Model:
    id: str
    ref: str
    digest: str | None = None  # expected, "sha256:<hex>"
    signature: str | None = None
    signing_key: str | None = None
    state: str = "Active"
    created_ms: float = 0.0
    last_verified_ms: float | None = None
    verified: bool | None = None  # None: never verified (or could not be)
    actual_digest: str | None = None
    verify_error: str | None = None

    def view(self) -> dict[str, Any]:
        return asdict(self)


class Catalog:
    def __init__(
        self, trust_policy: str = "permissive", signing_keys: dict[str, str] | None = None
    ):
        self.trust_policy = trust_policy
        self.signing_keys = dict(signing_keys or {})
        self.models: dict[str, Model] = {}
        self.verifications = 0

    # ---------------------------------------------------------------- registry

    def register(self, body: dict[str, Any], now: float) -> Model:
        mid, ref = body.get("id"), body.get("ref")
        if not isinstance(mid, str) or not re.match(r"^[A-Za-z0-9._:\-]{1,128}$", mid):
            raise OrchdError(Code.INVALID_PARAMS, "id: 1-128 letters, digits, '.', '_', ':', '-'")
        if not isinstance(ref, str):
            raise OrchdError(Code.INVALID_PARAMS, "ref: a model reference string is required")
        parse_ref(ref)
        digest = body.get("digest")
        if digest is not None and (not isinstance(digest, str) or not _DIGEST.match(digest)):
            raise OrchdError(Code.INVALID_PARAMS, "digest: expected sha256:<64 hex digits>")
        sig, key = body.get("signature"), body.get("signing_key")
        if sig is not None and (not isinstance(sig, str) or not isinstance(key, str)):
            raise OrchdError(Code.INVALID_PARAMS, "signature needs signing_key (both strings)")
        if mid in self.models:
            raise OrchdError(Code.INVALID_PARAMS, f"id: model {mid} is already in the catalog")
        m = Model(mid, ref, digest, sig, key, "Active", now)
        self.models[mid] = m
        return m

    def get(self, mid: str) -> Model:
        m = self.models.get(mid)
        if m is None:
            raise OrchdError(Code.NOT_FOUND, f"no model {mid!r} in the catalog")
        return m

    def delete(self, mid: str) -> None:
        self.get(mid)
        del self.models[mid]

    def set_state(self, mid: str, state: object) -> Model:
        m = self.get(mid)
        if state not in STATES:
            raise OrchdError(Code.INVALID_PARAMS, f"state: expected one of {', '.join(STATES)}")
        m.state = str(state)
        return m

    def record_verification(
        self, mid: str, actual: str | None, now: float, error: str = ""
    ) -> Model:
        """The shell computed ``actual`` (or failed to read the model: ``error``)."""
        m = self.get(mid)
        self.verifications += 1
        m.last_verified_ms = now
        m.actual_digest = actual
        m.verify_error = error or None
        if actual is None:
            # Could not look: no new trust on this account, and a known mismatch stays.
            m.verified = False if m.verified is False else None
        else:
            m.verified = m.digest is None or actual == m.digest
            if m.digest is None:
                m.digest = actual  # first verification pins the digest
        return m

    def resolve(self, ref_or_id: str) -> Model | None:
        m = self.models.get(ref_or_id)
        if m is not None:
            return m
        for m in self.models.values():
            if m.ref == ref_or_id:
                return m
        return None

    # ---------------------------------------------------------------- trust

    def signed(self, m: Model) -> bool:
        if m.signature is None or m.signing_key is None or m.digest is None:
            return False
        secret = self.signing_keys.get(m.signing_key)
        return secret is not None and hmac.compare_digest(sign(m.digest, secret), m.signature)

    def check(self, ref_or_id: str) -> str:
        """The canonical ref a task or reload may use, or the typed error why not."""
        m = self.resolve(ref_or_id)
        if m is None:
            if self.trust_policy == "strict":
                raise OrchdError(
                    Code.UNTRUSTED_ARTIFACT,
                    f"model {ref_or_id!r} is not in the catalog (trust policy strict)",
                )
            return ref_or_id
        if m.state == "Retired":
            raise OrchdError(Code.MODEL_DEPRECATED, f"model {m.id} is Retired")
        if m.verified is False:
            raise OrchdError(
                Code.UNTRUSTED_ARTIFACT,
                f"model {m.id}: digest mismatch (expected {m.digest}, found {m.actual_digest})",
            )
        if self.trust_policy == "strict" and not self.signed(m):
            raise OrchdError(
                Code.UNTRUSTED_ARTIFACT, f"model {m.id} is not signed by a trusted key"
            )
        return m.ref

    # ---------------------------------------------------------------- persistence

    def snapshot(self) -> dict[str, Any]:
        return {"version": 1, "models": [m.view() for m in self.models.values()]}

    def restore(self, snap: dict[str, Any]) -> None:
        self.models = {d["id"]: Model(**d) for d in snap.get("models", [])}
