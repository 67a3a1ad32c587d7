"""The wire protocol (ipc/protocol.py): every message round-trips through msgpack."""

from __future__ import annotations

import typing
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from ipc import protocol as p


def full_spec() -> p.TaskSpec:
    return p.TaskSpec(
        task_id="t-0",
        session_id="s-1",
        workload="completion",
        model_ref="mock:tiny",
        engine="mock",
        ctx=4096,
        priority="batch",
        max_tokens=64,
        deadline_ms=30_000,
        api_key_id="k1",
        seed=42,
        determinism="strict",
        sampler_profile_version="v2",
        prompt="Hello",
        inputs=["a", "b"],
        expected_tokens=10,
        kv_hint="reuse",
        placement={"mode": "prefer", "prefer_pools": ["p1"], "allow_fallback": True},
    )


def minimal_spec() -> p.TaskSpec:
    return p.TaskSpec("t-1", "s", "embedding", "hf:x/y", "mock", 128, "interactive", 1, 1000)


ERR = p.ErrorInfo(
    "ADMISSION_REJECT",
    "queue full",
    engine="mock",
    retry_after_ms=250,
    pool_id="p0",
    policy_label="reject",
)

SAMPLES: list[p.Message] = [
    p.Hello(role="supervisor", ident="sup-r0", pid=123, replica_id="r0"),
    p.Hello(role="frontend", ident="fe0", pid=7),
    p.Welcome(),
    p.Welcome(version=1, accepted=False, reason="version mismatch"),
    p.Heartbeat(),
    p.Goodbye(reason="shutdown"),
    p.Submit(1, full_spec()),
    p.Submit(2, minimal_spec()),
    p.Subscribe(3, "t-0", frontend=1, slot=17),
    p.Cancel(4, "t-0"),
    p.Cancel(5, "t-0", reason="deadline"),
    p.MetricsQuery(7),
    p.FenceDone(8),
    p.Admitted(9, "t-0", queue_position=3, predicted_start_ms=1500, backoff_ms=20),
    p.Subscribed(10, "t-0"),
    p.Done(11),
    p.Failed(12, ERR),
    p.Failed(13, p.ErrorInfo("NOT_FOUND", "no task")),
    p.MetricsText(15, b"# HELP x\nx 1\n"),
    p.Fence(16, slot=3),
    p.StreamFail(17, 3, "t-0", ERR),
    p.StreamEnd(18, 3, "t-0", "canceled"),
    p.Dispatch(full_spec(), queue_position=2, predicted_start_ms=100, frontend=1, slot=5),
    p.Dispatch(minimal_spec(), queue_position=1, predicted_start_ms=0),
    p.Attach("t-0", frontend=0, slot=9),
    p.Abort(19, "t-0", "client"),
    p.AbortDone(20, "t-0"),
    p.ReplicaStatus("r0", True, "mock", "mock-1.0", last_error="boom"),
    p.TaskEnded("t-0", "stop", 12, tokens_in=5, error_code="", first_token_ms=3.5, decode_ms=20.25),
    p.TaskEnded("t-0", "error", 0, error_code="DECODE_TIMEOUT"),
    p.PeerDown("sup-r0", "exit 1"),
    p.DrainAll(21, deadline_ms=30_000),
    p.ClusterReady(frontends=2, replicas=3),
]

ENGINE_SAMPLES: list[p.EngineMessage] = [
    p.EngSubmit(rid=1, prompt="hi", seed=7, max_tokens=16),
    p.EngSubmit(rid=2, prompt="hi", seed=7, max_tokens=16, temperature=0.7, top_p=0.9),
    p.EngTextStep(tokens=[(1, ["é", "", '"q"'])], finished=[(1, "stop")], errors=[(2, "x")]),
    p.EngAbort(rid=1),
    p.EngStep(tokens=[(1, [5, 6, 7]), (2, [])]),
    p.EngStep(tokens=[], finished=[(1, "stop")], errors=[(2, "oops")]),
    p.EngReady(engine_version="mock-1.0", vocab_size=512, pid=99),
]


def example(t: mi.Type) -> Any:
    """A value of type ``t`` with nothing left at its default: every field set."""
    if isinstance(t, mi.IntType):
        return 7
    if isinstance(t, mi.FloatType):
        return 1.5
    if isinstance(t, mi.StrType):
        return "s\u00e9"
    if isinstance(t, mi.BoolType):
        return True
    if isinstance(t, mi.BytesType):
        return b"\x00\xffbytes"
    if isinstance(t, mi.NoneType):
        return None
    if isinstance(t, mi.AnyType):
        return {"k": [1, "v", None, {"n": 2.5}]}
    if isinstance(t, mi.UnionType):
        return example(next(x for x in t.types if not isinstance(x, mi.NoneType)))
    if isinstance(t, mi.ListType):
        return [example(t.item_type), example(t.item_type)]
    if isinstance(t, mi.VarTupleType):
        return (example(t.item_type),)
    if isinstance(t, mi.TupleType):
        return tuple(example(x) for x in t.item_types)
    if isinstance(t, mi.DictType):
        return {example(t.key_type): example(t.value_type)}
    if isinstance(t, mi.LiteralType):
        return t.values[0]
    if isinstance(t, mi.EnumType):
        return next(iter(t.cls))
    if isinstance(t, mi.StructType):
        return t.cls(**{f.name: example(f.type) for f in t.fields})
    raise AssertionError(f"no example for {t!r}")


def build(cls: type) -> Any:
    return example(mi.type_info(cls))


MESSAGE_TYPES = typing.get_args(p.Message)
ENGINE_TYPES = typing.get_args(p.EngineMessage)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_every_message_type_round_trips(cls: type) -> None:
    msg = build(cls)
    back = p.decode(p.encode(msg))
    assert type(back) is cls
    assert back == msg
    # Each one also round-trips with only its required fields set.
    required = {f.name: example(f.type) for f in mi.type_info(cls).fields if f.required}
    short = cls(**required)
    assert p.decode(p.encode(short)) == short


@pytest.mark.parametrize("cls", ENGINE_TYPES, ids=lambda c: c.__name__)
def test_every_engine_message_type_round_trips(cls: type) -> None:
    msg = build(cls)
    back = p.decode_engine(p.encode(msg))
    assert type(back) is cls
    assert back == msg


def test_samples_are_messages() -> None:
    assert all(isinstance(m, MESSAGE_TYPES) for m in SAMPLES)
    assert all(isinstance(m, ENGINE_TYPES) for m in ENGINE_SAMPLES)


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_message_round_trip(msg) -> None:
    data = p.encode(msg)
    assert isinstance(data, bytes)
    back = p.decode(data)
    assert type(back) is type(msg)
    assert back == msg


@pytest.mark.parametrize("msg", ENGINE_SAMPLES, ids=lambda m: type(m).__name__)
def test_engine_message_round_trip(msg) -> None:
    back = p.decode_engine(p.encode(msg))
    assert type(back) is type(msg)
    assert back == msg


def test_tags_are_unique() -> None:
    types = list(typing.get_args(p.Message)) + list(typing.get_args(p.EngineMessage))
    tags = [t.__struct_config__.tag for t in types]
    assert len(set(tags)) == len(tags)


def test_engine_and_scheduler_messages_do_not_cross() -> None:
    with pytest.raises(msgspec.ValidationError):
        p.decode(p.encode(p.EngAbort(rid=1)))
    with pytest.raises(msgspec.ValidationError):
        p.decode_engine(p.encode(p.Heartbeat()))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x93\x01", b"not msgpack at all \xff\xfe"],
    ids=["empty", "reserved-byte", "truncated", "junk"],
)
def test_decoding_garbage_raises_decode_error(data: bytes) -> None:
    with pytest.raises(msgspec.DecodeError):
        p.decode(data)
    with pytest.raises(msgspec.DecodeError):
        p.decode_engine(data)


@pytest.mark.parametrize(
    "value",
    [
        ["NoSuchMessage", 1],  # unknown tag
        ["Done", "not-an-int"],  # wrong field type
        ["Submit", 1],  # missing required field
        {"req_id": 1},  # not array-like, no tag
        42,
    ],
)
def test_decoding_well_formed_but_invalid_raises_validation_error(value) -> None:
    with pytest.raises(msgspec.ValidationError):
        p.decode(msgspec.msgpack.encode(value))


def test_wire_form_is_tagged_array() -> None:
    assert msgspec.msgpack.decode(p.encode(p.Done(5))) == ["Done", 5]
    # Trailing fields with defaults may be left off by a sender; decode fills them in.
    assert p.decode(msgspec.msgpack.encode(["Cancel", 1, "t"])) == p.Cancel(1, "t", "client")


def test_hello_carries_protocol_version_by_default() -> None:
    assert isinstance(p.PROTOCOL_VERSION, int)
    hello = p.Hello(role="launcher", ident="launcher", pid=1)
    assert hello.version == p.PROTOCOL_VERSION
    back = p.decode(p.encode(hello))
    assert isinstance(back, p.Hello)
    assert back.version == p.PROTOCOL_VERSION
    assert p.Welcome().version == p.PROTOCOL_VERSION
    other = p.decode(p.encode(p.Hello(role="frontend", ident="fe0", pid=1, version=99)))
    assert isinstance(other, p.Hello) and other.version == 99
