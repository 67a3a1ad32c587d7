"""Artifacts, pure: their canonical bytes and ``sha256:`` id, the views the API shows, the
filters of a listing, and a stream transcript as ``{type, id, data}`` events.

A document is ``{kind, content}`` plus, where given, ``tags``, ``parent`` and ``metadata``;
all of them are content-addressed (the same body always gets the same id). ``created_ms`` is
when the store first held it, kept beside the document, not in it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

import msgspec

from orchd.core.errors import Code, OrchdError

KINDS = ("plan", "summary", "diff", "trace", "other")
MAX_TAGS = 32  # tags per artifact; each 1-64 characters
MAX_LIST = 1000  # artifacts one listing returns, newest first

_enc = msgspec.json.Encoder(order="sorted")


def canonical(
    kind: str,
    content: Any,
    tags: list[str] | None = None,
    parent: str | None = None,
    metadata: dict[str, Any] | None = None,
) -> bytes:
    """One byte string per document: sorted keys, no whitespace, UTF-8; optional fields only
    where given (so ``{kind, content}`` keeps the id it always had)."""
    doc: dict[str, Any] = {"kind": kind, "content": content}
    if tags:
        doc["tags"] = sorted(set(tags))
    if parent is not None:
        doc["parent"] = parent
    if metadata is not None:
        doc["metadata"] = metadata
    return _enc.encode(doc)


def artifact_id(doc: bytes) -> str:
    return "sha256:" + hashlib.sha256(doc).hexdigest()


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise OrchdError(
            Code.INVALID_PARAMS, f"kind: {kind!r} is not one of {', '.join(KINDS)}", param="kind"
        )


def summary(aid: str, doc: dict[str, Any], created_ms: int) -> dict[str, Any]:
    """The 201 answer, and a listing's entry: ``{id, kind, digest, created_ms, tags}`` (the
    id is the digest: artifacts are content-addressed)."""
    out: dict[str, Any] = {
        "id": aid,
        "kind": doc["kind"],
        "digest": aid,
        "created_ms": created_ms,
        "tags": list(doc.get("tags", [])),
    }
    if "parent" in doc:
        out["parent"] = doc["parent"]
    return out


def view(aid: str, doc: dict[str, Any], created_ms: int) -> dict[str, Any]:
    """What GET returns: the summary's fields, the content, and metadata where given."""
    out = summary(aid, doc, created_ms)
    out["content"] = doc["content"]
    if "metadata" in doc:
        out["metadata"] = doc["metadata"]
    return out


def matches(doc: dict[str, Any], kind: str | None, tag: str | None, parent: str | None) -> bool:
    """Whether ``doc`` passes a listing's filters (each one absent: any)."""
    if kind is not None and doc.get("kind") != kind:
        return False
    if tag is not None and tag not in doc.get("tags", ()):
        return False
    return parent is None or doc.get("parent") == parent


def transcript_events(frames: Iterable[bytes]) -> list[dict[str, Any]]:
    """SSE frames as ``{type, id, data}`` objects, in order: ``data`` is the JSON it carried
    (text where it is not JSON, e.g. OpenAI's ``[DONE]``); ``id`` is omitted where a frame had
    none; a frame without ``event:`` is a ``message`` (SSE's default)."""
    events: list[dict[str, Any]] = []
    for chunk in frames:
        for block in chunk.decode("utf-8", "replace").split("\n\n"):
            ev = parse_frame(block)
            if ev is not None:
                events.append(ev)
    return events


def parse_frame(block: str) -> dict[str, Any] | None:
    etype, eid, data = "message", None, []
    for line in block.split("\n"):
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            etype = value
        elif field == "id":
            eid = int(value) if value.isdigit() else value
        elif field == "data":
            data.append(value)
    if not data:
        return None
    text = "\n".join(data)
    try:
        payload: Any = json.loads(text)
    except ValueError:
        payload = text
    ev: dict[str, Any] = {"type": etype}
    if eid is not None:
        ev["id"] = eid
    ev["data"] = payload
    return ev
