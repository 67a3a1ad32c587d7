"""Task bodies as the contract defines them."""

from __future__ import annotations

import uuid
from typing import Any


def task_body(**over: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task_id": f"t-{uuid.uuid4().hex[:12]}",
        "session_id": f"s-{uuid.uuid4().hex[:12]}",
        "workload": "completion",
        "model_ref": "mock:tiny",
        "engine": "mock",
        "ctx": 2048,
        "priority": "interactive",
        "max_tokens": 16,
        "deadline_ms": 60_000,
        "seed": 1,
        "prompt": "hello",
    }
    body.update(over)
    return body
