"""The error taxonomy (orchd/core/errors.py) against DESIGN section 6."""

from __future__ import annotations

import pytest

from orchd.core.errors import TABLE, Code, OrchdError

ENVELOPE_KEYS = {
    "code",
    "message",
    "engine",
    "retriable",
    "retry_after_ms",
    "policy_label",
    "pool_id",
}

DESIGN_STATUS = {
    Code.INVALID_PARAMS: 400,
    Code.DEADLINE_UNMET: 400,
    Code.UNTRUSTED_ARTIFACT: 400,
    Code.MODEL_DEPRECATED: 403,
    Code.ADMISSION_REJECT: 429,
    Code.QUEUE_FULL_DROP_LRU: 429,
    Code.POOL_UNREADY: 503,
    Code.POOL_UNAVAILABLE: 503,
    Code.REPLICA_EXHAUSTED: 503,
    Code.DECODE_TIMEOUT: 500,
    Code.WORKER_RESET: 500,
    Code.INTERNAL: 500,
    # Auth: missing key 401, wrong key 403.
    Code.UNAUTHORIZED: 401,
    Code.FORBIDDEN: 403,
}


def test_every_code_has_a_table_entry() -> None:
    assert set(TABLE) == set(Code)
    for code in Code:
        assert code.value == code.name
        assert 400 <= TABLE[code].status <= 599


@pytest.mark.parametrize("code,status", sorted(DESIGN_STATUS.items()))
def test_status_per_design(code: Code, status: int) -> None:
    assert TABLE[code].status == status
    assert OrchdError(code, "x").status == status


def test_retriable_advice() -> None:
    for code in (
        Code.ADMISSION_REJECT,
        Code.QUEUE_FULL_DROP_LRU,
        Code.POOL_UNREADY,
        Code.POOL_UNAVAILABLE,
        Code.REPLICA_EXHAUSTED,
        Code.WORKER_RESET,
    ):
        assert TABLE[code].retriable, code
    for code in (
        Code.INVALID_PARAMS,
        Code.DEADLINE_UNMET,
        Code.UNTRUSTED_ARTIFACT,
        Code.UNAUTHORIZED,
        Code.FORBIDDEN,
        Code.MODEL_DEPRECATED,
        Code.NOT_FOUND,
        Code.INTERNAL,
    ):
        assert not TABLE[code].retriable, code


def test_envelope_has_exactly_the_contract_keys() -> None:
    e = OrchdError(
        Code.ADMISSION_REJECT,
        "queue full",
        engine="mock",
        retry_after_ms=250,
        policy_label="reject",
        pool_id="p0",
    )
    env = e.envelope()
    assert set(env) == ENVELOPE_KEYS
    assert env == {
        "code": "ADMISSION_REJECT",
        "message": "queue full",
        "engine": "mock",
        "retriable": True,
        "retry_after_ms": 250,
        "policy_label": "reject",
        "pool_id": "p0",
    }
    assert str(e) == "queue full"


def test_envelope_omits_what_has_no_value() -> None:
    env = OrchdError("NOT_FOUND", "no task").envelope()
    # The contract has no nulls: optional fields appear only with a value.
    assert env == {"code": "NOT_FOUND", "message": "no task", "retriable": False}
    assert set(env) < ENVELOPE_KEYS
    fields = [{"field": "ctx", "message": "too small"}]
    env = OrchdError("INVALID_PARAMS", "bad", errors=fields).envelope()
    assert env["errors"] == fields


def test_code_from_string_and_unknown_code() -> None:
    assert OrchdError("WORKER_RESET", "x").code is Code.WORKER_RESET
    with pytest.raises(ValueError):
        OrchdError("NO_SUCH_CODE", "x")
