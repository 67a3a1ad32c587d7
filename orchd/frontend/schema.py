"""Request bodies of the HTTP contract, validated by msgspec into typed structs."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from ipc.protocol import TaskSpec
from orchd.config import Limits
from orchd.core.errors import Code, OrchdError

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=256, pattern=r"^[A-Za-z0-9._:\-]+$")]


class Placement(msgspec.Struct, forbid_unknown_fields=True):
    mode: Literal["pin", "prefer", "auto"] = "auto"
    pin_pool_id: str | None = None
    prefer_pools: list[str] | None = None
    avoid_pools: list[str] | None = None
    require_device_mask: str | None = None
    allow_fallback: bool = True


class TaskBody(msgspec.Struct, forbid_unknown_fields=True):
    task_id: Id
    session_id: Id
    workload: Literal["completion", "embedding", "rerank"]
    model_ref: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    engine: Literal["llamacpp", "vllm", "tgi", "triton", "mock", "torch"]
    ctx: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
    priority: Literal["interactive", "batch"]
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=2**31 - 1)]
    deadline_ms: Annotated[int, msgspec.Meta(ge=1, le=2**53)]
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None
    determinism: Literal["strict", "best_effort"] | None = None
    sampler_profile_version: str | None = None
    prompt: Annotated[str, msgspec.Meta(max_length=1 << 20)] | None = None
    inputs: list[str] | None = None
    expected_tokens: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    kv_hint: Literal["reuse", "cold"] | None = None
    placement: Placement | None = None
    # Sampling, passed through to the engine; absent: the engine's default.
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None


_decoder = msgspec.json.Decoder(TaskBody)


def parse_task(body: bytes, limits: Limits, api_key_id: str) -> TaskSpec:
    try:
        t = _decoder.decode(body)
    except msgspec.ValidationError as e:
        raise OrchdError(Code.INVALID_PARAMS, f"invalid task: {e}") from None
    except msgspec.DecodeError as e:
        raise OrchdError(Code.INVALID_PARAMS, f"body is not valid JSON: {e}") from None
    if t.max_tokens > limits.max_tokens_limit:
        raise OrchdError(
            Code.INVALID_PARAMS,
            f"max_tokens: {t.max_tokens} exceeds the limit of {limits.max_tokens_limit}",
        )
    if t.ctx > limits.ctx_limit:
        raise OrchdError(Code.INVALID_PARAMS, f"ctx: {t.ctx} exceeds ctx_max {limits.ctx_limit}")
    placement: dict[str, Any] | None = msgspec.to_builtins(t.placement) if t.placement else None
    return TaskSpec(
        task_id=t.task_id,
        session_id=t.session_id,
        workload=t.workload,
        model_ref=t.model_ref,
        engine=t.engine,
        ctx=t.ctx,
        priority=t.priority,
        max_tokens=t.max_tokens,
        deadline_ms=t.deadline_ms,
        api_key_id=api_key_id,
        seed=t.seed,
        determinism=t.determinism,
        sampler_profile_version=t.sampler_profile_version,
        prompt=t.prompt,
        inputs=t.inputs,
        expected_tokens=t.expected_tokens,
        kv_hint=t.kv_hint,
        placement=placement,
        temperature=t.temperature,
        top_p=t.top_p,
    )


# ---------------------------------------------------------------- control-plane bodies


class DrainBody(msgspec.Struct, forbid_unknown_fields=True):
    deadline_ms: Annotated[int, msgspec.Meta(ge=0, le=86_400_000)]


class ReloadBody(msgspec.Struct, forbid_unknown_fields=True):
    new_model_ref: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]


class ModelBody(msgspec.Struct, forbid_unknown_fields=True):
    id: Id
    ref: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    digest: str | None = None
    signature: str | None = None
    signing_key: str | None = None


class StateBody(msgspec.Struct, forbid_unknown_fields=True):
    state: Literal["Active", "Retired"]


class ArtifactBody(msgspec.Struct, forbid_unknown_fields=True):
    kind: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[a-z][a-z0-9_.\-]*$")]
    content: Any


def parse_body(body: bytes, cls: type[msgspec.Struct]) -> dict[str, Any]:
    """Validate ``body`` as ``cls``; INVALID_PARAMS naming the field otherwise."""
    try:
        obj = msgspec.json.decode(body or b"null", type=cls)
    except msgspec.ValidationError as e:
        raise OrchdError(Code.INVALID_PARAMS, f"invalid body: {e}") from None
    except msgspec.DecodeError as e:
        raise OrchdError(Code.INVALID_PARAMS, f"body is not valid JSON: {e}") from None
    out: dict[str, Any] = msgspec.to_builtins(obj)
    return out
