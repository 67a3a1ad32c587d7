"""One error taxonomy, and one table mapping each code to its HTTP status, retry advice and
the error ``type`` OpenAI's API gives it (for the OpenAI-compatible routes)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Code(StrEnum):
    INVALID_PARAMS = "INVALID_PARAMS"
    DEADLINE_UNMET = "DEADLINE_UNMET"
    UNTRUSTED_ARTIFACT = "UNTRUSTED_ARTIFACT"
    UNAUTHORIZED = "UNAUTHORIZED"
    FORBIDDEN = "FORBIDDEN"
    MODEL_DEPRECATED = "MODEL_DEPRECATED"
    NOT_FOUND = "NOT_FOUND"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    RELOAD_FAILED = "RELOAD_FAILED"
    BUDGET_EXHAUSTED = "BUDGET_EXHAUSTED"
    ADMISSION_REJECT = "ADMISSION_REJECT"
    QUEUE_FULL_DROP_LRU = "QUEUE_FULL_DROP_LRU"
    POOL_UNREADY = "POOL_UNREADY"
    POOL_UNAVAILABLE = "POOL_UNAVAILABLE"
    REPLICA_EXHAUSTED = "REPLICA_EXHAUSTED"
    DECODE_TIMEOUT = "DECODE_TIMEOUT"
    WORKER_RESET = "WORKER_RESET"
    STREAM_OVERFLOW = "STREAM_OVERFLOW"
    INTERNAL = "INTERNAL"


@dataclass(frozen=True, slots=True)
class Rule:
    status: int
    retriable: bool
    openai_type: str  # OpenAI's error type for this status


_INVALID, _AUTH, _PERM = "invalid_request_error", "authentication_error", "permission_error"
_NOT_FOUND, _RATE, _SERVER = "not_found_error", "rate_limit_error", "server_error"
_UNAVAILABLE = "service_unavailable_error"

TABLE: dict[Code, Rule] = {
    Code.INVALID_PARAMS: Rule(400, False, _INVALID),
    Code.DEADLINE_UNMET: Rule(400, False, _INVALID),
    Code.UNTRUSTED_ARTIFACT: Rule(400, False, _INVALID),
    Code.UNAUTHORIZED: Rule(401, False, _AUTH),
    Code.FORBIDDEN: Rule(403, False, _PERM),
    Code.MODEL_DEPRECATED: Rule(403, False, _PERM),
    Code.NOT_FOUND: Rule(404, False, _NOT_FOUND),
    Code.PAYLOAD_TOO_LARGE: Rule(413, False, _INVALID),
    Code.RELOAD_FAILED: Rule(409, False, _INVALID),
    Code.BUDGET_EXHAUSTED: Rule(429, False, _RATE),
    Code.ADMISSION_REJECT: Rule(429, True, _RATE),
    Code.QUEUE_FULL_DROP_LRU: Rule(429, True, _RATE),
    Code.POOL_UNREADY: Rule(503, True, _UNAVAILABLE),
    Code.POOL_UNAVAILABLE: Rule(503, True, _UNAVAILABLE),
    Code.REPLICA_EXHAUSTED: Rule(503, True, _UNAVAILABLE),
    Code.DECODE_TIMEOUT: Rule(500, True, _SERVER),
    Code.WORKER_RESET: Rule(500, True, _SERVER),
    Code.STREAM_OVERFLOW: Rule(500, True, _SERVER),
    Code.INTERNAL: Rule(500, False, _SERVER),
}


def openai_error(envelope: dict[str, Any], param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body, ``{"error": {message, type, param, code}}``, for an envelope of
    ours; ``code`` keeps orchd's code so a client can still tell them apart."""
    code = Code(envelope["code"])
    return {
        "error": {
            "message": envelope["message"],
            "type": TABLE[code].openai_type,
            "param": param,
            "code": code.value,
        }
    }


class OrchdError(Exception):
    """An error with a code from the taxonomy; everything user-visible is built from it."""

    def __init__(
        self,
        code: Code | str,
        message: str,
        *,
        engine: str | None = None,
        retry_after_ms: int | None = None,
        policy_label: str | None = None,
        pool_id: str | None = None,
        param: str | None = None,
        errors: list[dict[str, str]] | None = None,
    ) -> None:
        super().__init__(message)
        self.errors = errors  # every field at fault, [{field, message}], where several are
        self.param = param  # the request field at fault, where one is
        self.code = Code(code)
        self.message = message
        self.engine = engine
        self.retry_after_ms = retry_after_ms
        self.policy_label = policy_label
        self.pool_id = pool_id

    @property
    def status(self) -> int:
        return TABLE[self.code].status

    @property
    def retriable(self) -> bool:
        return TABLE[self.code].retriable

    def openai(self) -> dict[str, Any]:
        return openai_error(self.envelope(), self.param)

    def envelope(self) -> dict[str, Any]:
        """The contract's error body (also the data of an SSE ``error`` event)."""
        env: dict[str, Any] = {
            "code": self.code.value,
            "message": self.message,
            "retriable": self.retriable,
        }
        # Optional fields appear only with a value (the contract has no nulls).
        for k in ("engine", "retry_after_ms", "policy_label", "pool_id"):
            v = getattr(self, k)
            if v is not None:
                env[k] = v
        if self.errors:
            env["errors"] = self.errors
        return env
