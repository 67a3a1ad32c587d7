"""Content addressing for artifacts: canonical bytes and their ``sha256:`` id (pure)."""

from __future__ import annotations

import hashlib
from typing import Any

import msgspec

_enc = msgspec.json.Encoder(order="sorted")


def canonical(kind: str, content: Any) -> bytes:
    """One byte string per document: sorted keys, no whitespace, UTF-8."""
    return _enc.encode({"kind": kind, "content": content})


def artifact_id(doc: bytes) -> str:
    return "sha256:" + hashlib.sha256(doc).hexdigest()
