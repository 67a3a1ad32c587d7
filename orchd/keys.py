"""API keys as the processes hold them: a digest and a non-secret id, never the secret.

The config names keys (``server.api_keys``, ``api_keys_file``); the frontend checks requests
against these entries, and logs, metrics and the scheduler see only the id.
"""

from __future__ import annotations

import hashlib
import re

import msgspec

from orchd.config import ApiKey, Role

_SHA256 = re.compile(r"^sha256:[0-9a-f]{64}$")


class KeyEntry(msgspec.Struct, frozen=True):
    """An accepted key as the frontend holds it: only its digest, never the secret."""

    digest: bytes  # sha256 of the key
    id: str  # key_id: what logs, metrics and the scheduler see
    role: Role
    max_streams: int  # 0 = limits.max_streams_per_key


def key_entry(entry: str | ApiKey) -> KeyEntry:
    role: Role = "admin"
    if isinstance(entry, str):
        key, streams = entry, 0
    else:
        key, role, streams = entry.key, entry.role, entry.max_streams
    hashed = _SHA256.match(key)
    digest = bytes.fromhex(key[7:]) if hashed else hashlib.sha256(key.encode()).digest()
    return KeyEntry(digest, digest.hex()[:12], role, streams)


def key_id(key: str | ApiKey) -> str:
    """A non-secret, stable id for an API key: what logs, metrics and the scheduler see. A
    key given as ``sha256:<hex>`` has the id of the key it is the hash of."""
    return key_entry(key).id
