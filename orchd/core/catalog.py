"""The model catalog: models, their digests and signatures, lifecycle and the trust policy.

Pure: the shell computes file digests (``verify``) and persists ``snapshot()``; this module
decides. Model references are parsed by :mod:`orchd.core.refs`.

A model needs an ``id`` and a ``digest`` (``<algo>:<hex>``) or a ``source_url`` (``ref`` is
orchd's alias of it); without a digest, its first verification pins one. Optional, as the
contract lists them: ``tags``, ``manifests``, ``signatures``, ``sbom`` and ``trust_policy``.

A model is *signed* when it carries a ``signature`` that is the HMAC-SHA256 of its digest
under one of the configured signing keys (``signing_key`` names it): orchd checks that one
itself. The ``signatures`` a client lists are recorded as given, and count as a signature
being present (no warning) but never as verified.

Trust, evaluated when a task or reload names the model (and shown as ``warnings``):

- a digest mismatch (a verification found other bytes) and a Retired model are refused under
  any policy, before admission;
- the policy is the model's ``trust_policy``, else the catalog's (``catalog.trust_policy``);
  a model's own policy cannot loosen a ``strict`` catalog;
- ``strict`` refuses what its policy requires and is missing: a verified signature (always
  required by a strict catalog without a model policy, else ``require_signature``), an SBOM
  (``require_sbom``), a registry outside ``allowed_registries``; and an uncatalogued ref;
- ``permissive`` admits those with a warning each (a missing signature or SBOM always warns).

Retiring a model with ``deadline_ms`` lets tasks already running on it finish until then
(``retire_deadline_ms``, wall clock); the control plane ends the rest (``overdue``).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from orchd.core.errors import Code, OrchdError
from orchd.core.refs import parse, parse_ref, registry_of

__all__ = ["Catalog", "Model", "parse_ref", "sign"]

STATES = ("Active", "Retired")
DIGEST = re.compile(r"^(?P<algo>[a-z0-9]{2,16}):(?P<hex>[0-9a-f]{8,128})$")
_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
MAX_RETIRE_DEADLINE_MS = 86_400_000


def sign(digest: str, secret: str) -> str:
    return hmac.new(secret.encode(), digest.encode(), hashlib.sha256).hexdigest()


def check_digest(digest: object, name: str = "digest") -> str:
    """``digest`` if it is ``<algo>:<hex>`` (lowercase, 8-128 hex digits), else
    INVALID_PARAMS naming ``name``. A digest shorter than its algorithm's is kept as given:
    a verification then finds the full one, a mismatch."""
    if not isinstance(digest, str) or not DIGEST.match(digest):
        raise OrchdError(
            Code.INVALID_PARAMS, f"{name}: expected <algo>:<lowercase hex>, e.g. sha256:<64 hex>"
        )
    return digest


@dataclass(slots=True)
class Model:
    id: str
    ref: str  # its source_url ("" if none: the model is known by id and digest only)
    digest: str | None = None  # expected, "<algo>:<hex>"
    signature: str | None = None  # HMAC-SHA256 of the digest under signing_key's secret
    signing_key: str | None = None
    state: str = "Active"
    created_ms: float = 0.0
    last_verified_ms: float | None = None
    verified: bool | None = None  # None: never verified (or could not be)
    actual_digest: str | None = None
    verify_error: str | None = None
    tags: list[str] = field(default_factory=list)
    manifests: list[dict[str, Any]] = field(default_factory=list)
    signatures: list[dict[str, Any]] = field(default_factory=list)
    sbom: dict[str, Any] | None = None
    trust_policy: dict[str, Any] | None = None
    retire_deadline_ms: float | None = None  # wall clock; running tasks end then
    warnings: list[str] = field(default_factory=list)

    def view(self) -> dict[str, Any]:
        """The contract's Model: fields without a value are omitted (never null); ``ref``
        and ``source_url`` are the same string."""
        out = {k: v for k, v in asdict(self).items() if v is not None and v != ""}
        for k in ("created_ms", "last_verified_ms", "retire_deadline_ms"):
            if k in out:
                out[k] = int(out[k])
        if self.ref:
            out["source_url"] = self.ref
        return out


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
        mid = body.get("id")
        if not isinstance(mid, str) or not _ID.match(mid):
            raise OrchdError(Code.INVALID_PARAMS, "id: 1-128 letters, digits, '.', '_', ':', '-'")
        ref, url = body.get("ref"), body.get("source_url")
        if ref is not None and url is not None and ref != url:
            raise OrchdError(Code.INVALID_PARAMS, "ref: an alias of source_url; they differ")
        src = url if url is not None else ref
        if src is not None and not isinstance(src, str):
            raise OrchdError(Code.INVALID_PARAMS, "ref: a model reference string")
        digest = body.get("digest")
        if digest is not None:
            check_digest(digest)
        if src is None and digest is None:
            raise OrchdError(
                Code.INVALID_PARAMS, "ref: a model needs a digest or a source_url (ref)"
            )
        if src is not None:
            parse(src)
        sig, key = body.get("signature"), body.get("signing_key")
        if sig is not None and (not isinstance(sig, str) or not isinstance(key, str)):
            raise OrchdError(Code.INVALID_PARAMS, "signature needs signing_key (both strings)")
        if mid in self.models:
            raise OrchdError(Code.INVALID_PARAMS, f"id: model {mid} is already in the catalog")
        m = Model(mid, src or "", digest, sig, key, "Active", now)
        m.tags = list(body.get("tags") or [])
        m.manifests = list(body.get("manifests") or [])
        m.signatures = list(body.get("signatures") or [])
        m.sbom = body.get("sbom")
        m.trust_policy = body.get("trust_policy")
        self.trust(m)
        self.models[mid] = m
        return m

    def get(self, mid: str) -> Model:
        m = self.models.get(mid)
        if m is None:
            raise OrchdError(Code.NOT_FOUND, f"no model {mid!r} in the catalog")
        return m

    def listing(self) -> list[dict[str, Any]]:
        return [self.models[k].view() for k in sorted(self.models)]

    def delete(self, mid: str) -> None:
        self.get(mid)
        del self.models[mid]

    def set_state(
        self, mid: str, state: object, now: float = 0.0, deadline_ms: int | None = None
    ) -> Model:
        """``deadline_ms`` (with Retired): running tasks may finish until ``now`` plus it."""
        m = self.get(mid)
        if state not in STATES:
            raise OrchdError(Code.INVALID_PARAMS, f"state: expected one of {', '.join(STATES)}")
        if deadline_ms is not None and (
            state != "Retired" or not 0 <= deadline_ms <= MAX_RETIRE_DEADLINE_MS
        ):
            raise OrchdError(
                Code.INVALID_PARAMS,
                f"deadline_ms: 0-{MAX_RETIRE_DEADLINE_MS}, and only to retire a model",
            )
        m.state = str(state)
        m.retire_deadline_ms = None if deadline_ms is None else now + deadline_ms
        return m

    def overdue(self, now: float) -> list[Model]:
        """Retired models whose deadline has passed (their running tasks end now); each is
        reported once (its deadline is then cleared)."""
        out = []
        for m in self.models.values():
            due = m.retire_deadline_ms
            if m.state == "Retired" and due is not None and now >= due:
                m.retire_deadline_ms = None
                out.append(m)
        return out

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
        self.trust(m)
        return m

    def resolve(self, ref_or_id: str) -> Model | None:
        m = self.models.get(ref_or_id)
        if m is not None:
            return m
        for m in self.models.values():
            if m.ref and m.ref == ref_or_id:
                return m
        return None

    # ---------------------------------------------------------------- trust

    def signed(self, m: Model) -> bool:
        if m.signature is None or m.signing_key is None or m.digest is None:
            return False
        secret = self.signing_keys.get(m.signing_key)
        return secret is not None and hmac.compare_digest(sign(m.digest, secret), m.signature)

    def policy(self, m: Model) -> dict[str, Any]:
        """The model's effective trust policy (a strict catalog stays strict)."""
        own = dict(m.trust_policy or {})
        if not own:
            strict = self.trust_policy == "strict"
            return {"mode": self.trust_policy, "require_signature": strict}
        if self.trust_policy == "strict":
            own["mode"] = "strict"
        return own

    def findings(self, m: Model) -> list[tuple[bool, str]]:
        """What the policy finds missing, each ``(required, what)``."""
        pol = self.policy(m)
        out: list[tuple[bool, str]] = []
        if not self.signed(m):
            declared = bool(m.signatures) or m.signature is not None
            if pol.get("require_signature") or not declared:
                what = "signature not verified by orchd" if declared else "no signature"
                out.append((bool(pol.get("require_signature")), what))
        if m.sbom is None:
            out.append((bool(pol.get("require_sbom")), "no SBOM"))
        allowed = pol.get("allowed_registries") or []
        if allowed and m.ref:
            where = registry_of(parse(m.ref))
            if where and where not in allowed:
                out.append((True, f"registry {where} is not in allowed_registries"))
        return out

    def trust(self, m: Model) -> list[str]:
        """The warnings of ``m`` (what its policy finds missing), recorded on the model."""
        m.warnings = [what for _, what in self.findings(m)]
        return m.warnings

    def enforce(self, m: Model) -> None:
        """UNTRUSTED_ARTIFACT for the first thing a strict policy requires and is missing."""
        if self.policy(m).get("mode") != "strict":
            return
        for required, what in self.findings(m):
            if required and "signature" in what:
                raise OrchdError(
                    Code.UNTRUSTED_ARTIFACT,
                    f"model {m.id} is not signed by a trusted key (trust policy strict)",
                )
            if required:
                raise OrchdError(
                    Code.UNTRUSTED_ARTIFACT, f"model {m.id}: {what} (trust policy strict)"
                )

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
        self.trust(m)
        self.enforce(m)
        return m.ref or m.id

    # ---------------------------------------------------------------- persistence

    def snapshot(self) -> dict[str, Any]:
        return {"version": 1, "models": [asdict(m) for m in self.models.values()]}

    def restore(self, snap: dict[str, Any]) -> None:
        self.models = {d["id"]: Model(**d) for d in snap.get("models", [])}
