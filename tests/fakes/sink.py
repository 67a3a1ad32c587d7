"""A recording EngineSink for driving an adapter directly, and a condition wait."""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class End:
    rid: int
    kind: str  # "finish" | "error" | "embedding"
    reason: str  # finish reason or error code
    message: str = ""
    retry_after_ms: int | None = None


@dataclass
class RecordingSink:
    tokens: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))
    ends: list[End] = field(default_factory=list)
    dead: list[str] = field(default_factory=list)
    after_end: list[int] = field(default_factory=list)  # rids with events after their end
    usage: dict[int, int] = field(default_factory=dict)  # rid: prompt tokens, as reported
    usage_twice: list[int] = field(default_factory=list)  # rids whose usage came again
    calls: list[tuple[str, int]] = field(default_factory=list)  # (sink method, rid), in order
    vectors: dict[int, list[list[float]]] = field(default_factory=dict)  # embedding results

    def _check(self, rid: int) -> None:
        if any(e.rid == rid for e in self.ends):
            self.after_end.append(rid)

    def on_tokens(self, rid: int, texts_json: list[bytes]) -> None:
        self._check(rid)
        self.calls.append(("on_tokens", rid))
        self.tokens[rid] += [json.loads(t) for t in texts_json]

    def on_usage(self, rid: int, prompt_tokens: int) -> None:
        self._check(rid)
        if rid in self.usage:
            self.usage_twice.append(rid)
        self.calls.append(("on_usage", rid))
        self.usage[rid] = prompt_tokens

    def on_finish(self, rid: int, reason: str) -> None:
        self._check(rid)
        self.calls.append(("on_finish", rid))
        self.ends.append(End(rid, "finish", reason))

    def on_error(
        self, rid: int, code: str, message: str, retry_after_ms: int | None = None
    ) -> None:
        self._check(rid)
        self.calls.append(("on_error", rid))
        self.ends.append(End(rid, "error", code, message, retry_after_ms))

    def on_embedding(self, rid: int, vectors: list[list[float]]) -> None:
        """An embedding result ends its request, as a finish does."""
        self._check(rid)
        self.calls.append(("on_embedding", rid))
        self.vectors[rid] = vectors
        self.ends.append(End(rid, "embedding", ""))

    def on_engine_dead(self, reason: str) -> None:
        self.dead.append(reason)

    def flush(self) -> None:
        pass

    def end_of(self, rid: int) -> End | None:
        return next((e for e in self.ends if e.rid == rid), None)

    async def wait_end(self, rid: int, timeout: float = 10.0) -> End:
        await wait_until(lambda: self.end_of(rid) is not None, timeout, f"end of request {rid}")
        end = self.end_of(rid)
        assert end is not None
        return end


async def wait_until(pred: Callable[[], object], timeout: float, what: str = "condition") -> None:
    """Poll ``pred`` until true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)
