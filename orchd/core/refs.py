"""Model references, parsed (pure: nothing here touches a disk or a network).

Every documented form::

    hf:<org>/<repo>[/<path/to/file>][@<revision>]     a Hugging Face repo, or one file of it
    file:/<absolute path>     /<absolute path>           a file or directory on this host
    <relative/path>                                      under the model roots (catalog.model_roots)
    https://<host>[:<port>]/<path>
    s3://<bucket>/<key>
    oci://<registry>[:<port>]/<repo>[:<tag>|@sha256:<hex>]
    mock:<name>     random:<name>                        the mock engine; random torch weights

Resolving a remote ref (hf, https, s3, oci) needs the network; where it cannot be reached the
loader raises :func:`unreachable`, a typed error that names the ref and says what to do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from orchd.core.errors import Code, OrchdError

REMOTE = frozenset({"hf", "https", "s3", "oci"})
MAX_REF = 2048  # characters

_SCHEME = re.compile(r"^[a-z][a-z0-9+.\-]*$")
_SEG = r"[A-Za-z0-9_][\w.\-]*"
_HF = re.compile(
    rf"^(?P<org>[A-Za-z0-9][\w.\-]*)/(?P<repo>{_SEG})(?P<path>(?:/{_SEG})*)(?:@(?P<rev>[\w.\-/]+))?$"
)
_OCI = re.compile(
    r"^//(?P<registry>[\w.\-]+(?::\d+)?)/(?P<repo>[\w.\-/]+?)"
    r"(?::(?P<tag>[\w.\-]+)|@(?P<digest>sha256:[0-9a-f]{64}))?$"
)
_S3 = re.compile(r"^//(?P<bucket>[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])/(?P<key>.+)$")
_HTTPS = re.compile(r"^//(?P<host>[\w.\-]+(?::\d+)?)(?P<path>/.+)$")
_NAME = re.compile(r"^[\w.\-]+$")

FORMS = {
    "hf": "hf:<org>/<name>[/<path>][@<revision>]",
    "s3": "s3://<bucket>/<key>",
    "https": "https://<host>/<path>",
    "oci": "oci://<registry>/<repo>[:<tag>|@sha256:<hex>]",
    "mock": "mock:<name>",
    "random": "random:<name>",
}


@dataclass(frozen=True, slots=True)
class ModelRef:
    """A parsed reference. ``scheme`` is one of hf, file, relative, https, s3, oci, mock,
    random; ``host`` is the org (hf), host (https), bucket (s3) or registry (oci); ``name`` the
    repo (hf, oci) or name (mock, random); ``path`` the file path, URL path or s3 key; ``tag``
    a revision (hf), tag or digest (oci)."""

    ref: str
    scheme: str
    host: str = ""
    name: str = ""
    path: str = ""
    tag: str = ""

    @property
    def remote(self) -> bool:
        return self.scheme in REMOTE

    @property
    def rest(self) -> str:
        """What follows ``<scheme>:`` (the whole ref for a relative path)."""
        return self.ref if self.scheme == "relative" else self.ref.partition(":")[2]


def _bad(ref: str, why: str) -> OrchdError:
    return OrchdError(Code.INVALID_PARAMS, f"model ref {ref!r} {why}", param="model_ref")


def _malformed(ref: str, scheme: str) -> OrchdError:
    return _bad(ref, f"is malformed: expected {FORMS[scheme]}")


def _path_ok(path: str) -> bool:
    parts = path.split("/")
    return "\0" not in path and ".." not in parts


def parse(ref: str) -> ModelRef:
    """The parsed ``ref``, or INVALID_PARAMS saying which form was expected."""
    if not ref or len(ref) > MAX_REF:
        raise _bad(ref[:64], f"must be 1-{MAX_REF} characters")
    head, sep, rest = ref.partition(":")
    if not sep or not _SCHEME.match(head):
        # No scheme: a path. Absolute is a file; relative is looked up under the model roots.
        if ref.startswith("/"):
            if not _path_ok(ref):
                raise _bad(ref, "is not a usable path ('..' or NUL)")
            return ModelRef(ref, "file", path=ref)
        if not _path_ok(ref):
            raise _bad(ref, "is not a usable relative path ('..' or NUL)")
        return ModelRef(ref, "relative", path=ref)
    scheme = head
    if scheme == "file":
        if not rest.startswith("/") or not _path_ok(rest):
            raise _bad(ref, "is not usable: file: needs an absolute path (no '..')")
        return ModelRef(ref, "file", path=rest)
    if scheme == "http":
        raise _bad(ref, "uses plain http, which is not allowed; use https://<host>/<path>")
    if scheme not in FORMS:
        raise _bad(
            ref, f"has an unknown scheme {scheme!r} (hf, file, https, s3, oci, mock, random)"
        )
    m: re.Match[str] | None
    if scheme == "hf":
        m = _HF.match(rest)
        if m is None:
            raise _malformed(ref, scheme)
        return ModelRef(
            ref, "hf", m["org"], m["repo"], (m["path"] or "").lstrip("/"), m["rev"] or ""
        )
    if scheme == "oci":
        m = _OCI.match(rest)
        if m is None:
            raise _malformed(ref, scheme)
        return ModelRef(ref, "oci", m["registry"], m["repo"], tag=m["tag"] or m["digest"] or "")
    if scheme == "s3":
        m = _S3.match(rest)
        if m is None:
            raise _malformed(ref, scheme)
        return ModelRef(ref, "s3", m["bucket"], path=m["key"])
    if scheme == "https":
        m = _HTTPS.match(rest)
        if m is None:
            raise _malformed(ref, scheme)
        return ModelRef(ref, "https", m["host"], path=m["path"])
    if not _NAME.match(rest):
        raise _malformed(ref, scheme)
    return ModelRef(ref, scheme, name=rest)


def parse_ref(ref: str) -> tuple[str, str]:
    """``(scheme, rest)`` of ``ref`` (see :func:`parse`)."""
    r = parse(ref)
    return r.scheme, r.rest


def registry_of(r: ModelRef) -> str:
    """Where a remote ref is fetched from, as a trust policy's ``allowed_registries`` names it:
    ``huggingface.co`` for hf, else the host, bucket or registry; '' for a local ref."""
    if r.scheme == "hf":
        return "huggingface.co"
    return r.host if r.remote else ""


def unreachable(ref: str, why: str) -> OrchdError:
    """A remote ref that could not be fetched: which one, why, and what to do instead."""
    r = parse(ref)
    return OrchdError(
        Code.POOL_UNAVAILABLE,
        f"model ref {ref!r} ({r.scheme}) could not be fetched: {why}; put the model under "
        "catalog.model_roots and use its file: ref (or a relative path)",
        param="model_ref",
    )
