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


def field_errors(body: bytes, cls: type[msgspec.Struct]) -> list[dict[str, str]]:
    """Every missing, unknown or invalid field of ``body`` as ``cls``, ``[{field, message}]``
    (msgspec stops at the first; a client should learn them all from one 400)."""
    try:
        obj = msgspec.json.decode(body or b"null")
    except msgspec.DecodeError as e:
        return [{"field": "", "message": f"body is not valid JSON: {e}"}]
    if not isinstance(obj, dict):
        return [{"field": "", "message": "body: expected a JSON object"}]
    errors: list[dict[str, str]] = []
    fields = msgspec.structs.fields(cls)
    known = {f.encode_name for f in fields}
    for f in fields:
        if f.encode_name not in obj:
            if f.required:
                errors.append({"field": f.encode_name, "message": "required field is missing"})
            continue
        try:
            msgspec.convert(obj[f.encode_name], type=f.type)
        except msgspec.ValidationError as e:
            where = str(e).rpartition(" - at `$")
            path = f.encode_name + (where[2].rstrip("`") if where[1] else "")
            errors.append({"field": path, "message": where[0] if where[1] else str(e)})
    for name in obj:
        if name not in known:
            errors.append({"field": str(name), "message": "unknown field"})
    return errors


def invalid(what: str, errors: list[dict[str, str]]) -> OrchdError:
    """One INVALID_PARAMS naming every field at fault (``errors`` in the envelope)."""
    listed = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
    return OrchdError(
        Code.INVALID_PARAMS,
        f"invalid {what} ({len(errors)} problem{'s' if len(errors) != 1 else ''}): {listed}",
        param=errors[0]["field"] or None if errors else None,
        errors=errors,
    )


def _named_engine(body: bytes) -> str | None:
    """The engine a request named, for the envelope of its error (a string, or None)."""
    try:
        obj = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    engine = obj.get("engine") if isinstance(obj, dict) else None
    return engine if isinstance(engine, str) and len(engine) <= 64 else None


def parse_task(body: bytes, limits: Limits, api_key_id: str) -> TaskSpec:
    try:
        t = _decoder.decode(body)
    except (msgspec.ValidationError, msgspec.DecodeError):
        t = None
    errors = field_errors(body, TaskBody) if t is None else []
    if t is not None and t.max_tokens > limits.max_tokens_limit:
        msg = f"{t.max_tokens} exceeds the limit of {limits.max_tokens_limit}"
        errors.append({"field": "max_tokens", "message": msg})
    if t is not None and t.ctx > limits.ctx_limit:
        errors.append({"field": "ctx", "message": f"{t.ctx} exceeds ctx_max {limits.ctx_limit}"})
    if errors or t is None:
        e = invalid("task", errors or [{"field": "", "message": "not a task"}])
        e.engine = _named_engine(body)
        raise e
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


Digest = Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9]{2,16}:[0-9a-f]{8,128}$")]
Ref = Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
Short = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]


class Manifest(msgspec.Struct, forbid_unknown_fields=True):
    digest: Digest
    size_bytes: Annotated[int, msgspec.Meta(ge=0)]


class Signature(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    signer: Short
    algo: Short
    verified: bool = False  # as the client says; orchd verifies only its own HMAC signature
    timestamp_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None


class Sbom(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    uri: Ref
    digest: Digest | None = None


class TrustPolicy(msgspec.Struct, forbid_unknown_fields=True):
    mode: Literal["strict", "permissive"]
    allowed_registries: Annotated[list[Short], msgspec.Meta(max_length=64)] = []
    require_signature: bool = False
    require_sbom: bool = False
    ca_roots: Annotated[
        list[Annotated[str, msgspec.Meta(max_length=16384)]], msgspec.Meta(max_length=16)
    ] = []


class ModelBody(msgspec.Struct, forbid_unknown_fields=True):
    id: Id
    digest: Digest | None = None
    source_url: Ref | None = None
    ref: Ref | None = None  # orchd's alias of source_url
    tags: (
        Annotated[
            list[Annotated[str, msgspec.Meta(min_length=1, max_length=64)]],
            msgspec.Meta(max_length=32),
        ]
        | None
    ) = None
    manifests: Annotated[list[Manifest], msgspec.Meta(max_length=256)] | None = None
    signatures: Annotated[list[Signature], msgspec.Meta(max_length=16)] | None = None
    sbom: Sbom | None = None
    trust_policy: TrustPolicy | None = None
    signature: str | None = None
    signing_key: str | None = None


class StateBody(msgspec.Struct, forbid_unknown_fields=True):
    state: Literal["Active", "Retired"]
    deadline_ms: Annotated[int, msgspec.Meta(ge=0, le=86_400_000)] | None = None


ArtifactId = Annotated[str, msgspec.Meta(pattern=r"^sha256:[0-9a-f]{64}$")]
Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class ArtifactBody(msgspec.Struct, forbid_unknown_fields=True):
    kind: Literal["plan", "summary", "diff", "trace", "other"]
    content: Any
    tags: Annotated[list[Tag], msgspec.Meta(max_length=32)] | None = None
    parent: ArtifactId | None = None
    metadata: dict[str, Any] | None = None


def parse_body(body: bytes, cls: type[msgspec.Struct]) -> dict[str, Any]:
    """Validate ``body`` as ``cls``; INVALID_PARAMS naming the field otherwise."""
    try:
        obj = msgspec.json.decode(body or b"null", type=cls)
    except (msgspec.ValidationError, msgspec.DecodeError):
        errs = field_errors(body, cls) or [{"field": "", "message": "invalid"}]
        raise invalid("body", errs) from None
    out: dict[str, Any] = msgspec.to_builtins(obj)
    return out
