"""Pools and placement constraints (orchd/core/pools.py)."""

from __future__ import annotations

from typing import Any

import pytest

from orchd.core.errors import Code, OrchdError
from orchd.core.placement import ReplicaView, make_policy
from orchd.core.pools import Pools, PoolState

M = "mock:tiny"
OTHER = "mock:other"


def pool(pid: str, model: str = M, engine: str = "mock", **kw: Any) -> PoolState:
    return PoolState(
        pid,
        engine,
        model,
        kw.pop("engine_version", ""),
        "v1",
        kw.pop("workloads", ["completion"]),
        1024,
        **kw,
    )


def rep(rid: str, pid: str, ready: bool = True, devices: str = "", slots: int = 2) -> ReplicaView:
    return ReplicaView(
        rid, pid, "mock", slots, ready=ready, devices=devices, connected=ready, free_vram_bytes=0
    )


def make(*pools: PoolState, reps: list[ReplicaView]) -> Pools:
    return Pools(pools, {r.id: r for r in reps})


def two_pools() -> Pools:
    """a (r0 on gpu 0, r1 on gpu 1) and b (r2 on gpu 2), both serving mock:tiny; c another."""
    return make(
        pool("a"),
        pool("b"),
        pool("c", OTHER),
        reps=[
            rep("r0", "a", devices="0"),
            rep("r1", "a", devices="1"),
            rep("r2", "b", devices="2"),
            rep("r3", "c", devices="0"),
        ],
    )


def ids(pools: list[PoolState]) -> list[str]:
    return [p.id for p in pools]


def refused(fn, *args: Any) -> OrchdError:
    with pytest.raises(OrchdError) as ei:
        fn(*args)
    return ei.value


def targets(ps: Pools, placement: dict | None = None, model: str = M, workload: str = "completion"):
    return ps.targets("mock", model, workload, placement)


# ---------------------------------------------------------------- construction


def test_replicas_join_their_pools() -> None:
    ps = two_pools()
    assert ps.pools["a"].replicas == ["r0", "r1"]
    assert ps.pools["b"].replicas == ["r2"]
    assert ps.get("a") is ps.pools["a"]
    e = refused(ps.get, "zz")
    assert e.code is Code.NOT_FOUND
    assert ids(ps.serving("mock", M)) == ["a", "b"]
    assert ps.serving("vllm", M) == []


# ---------------------------------------------------------------- targets: errors


def test_no_pool_serves_engine_or_model() -> None:
    ps = two_pools()
    e = refused(targets, ps, None, "mock:nope")
    assert e.code is Code.INVALID_PARAMS
    assert e.message.startswith("model_ref:")
    assert "mock/mock:nope" in e.message and "mock/mock:tiny" in e.message
    e = refused(ps.targets, "vllm", M, "completion", None)
    assert e.code is Code.INVALID_PARAMS and "vllm/mock:tiny" in e.message


def test_unsupported_workload() -> None:
    ps = make(pool("a"), pool("e", workloads=["embedding"]), reps=[rep("r0", "a"), rep("r1", "e")])
    e = refused(targets, ps, None, M, "rerank")
    assert e.code is Code.INVALID_PARAMS
    assert e.message.startswith("workload:") and "'rerank'" in e.message
    assert ids(targets(ps, None, M, "embedding")) == ["e"]
    assert ids(targets(ps, None, M, "completion")) == ["a"]


def test_pin_requires_pin_pool_id() -> None:
    e = refused(targets, two_pools(), {"mode": "pin"})
    assert e.code is Code.INVALID_PARAMS and "pin_pool_id" in e.message


def test_pin_to_unknown_pool() -> None:
    e = refused(targets, two_pools(), {"mode": "pin", "pin_pool_id": "zz"})
    assert e.code is Code.INVALID_PARAMS
    assert e.message.startswith("placement.pin_pool_id") and "'zz'" in e.message


def test_pin_to_pool_serving_another_model() -> None:
    e = refused(targets, two_pools(), {"mode": "pin", "pin_pool_id": "c"})
    assert e.code is Code.INVALID_PARAMS
    assert "pool c does not serve mock/mock:tiny" in e.message


def test_pinned_pool_draining_without_fallback() -> None:
    ps = two_pools()
    ps.pools["a"].draining = True
    e = refused(targets, ps, {"mode": "pin", "pin_pool_id": "a", "allow_fallback": False})
    assert e.code is Code.POOL_UNAVAILABLE
    assert (e.pool_id, e.status, e.retriable) == ("a", 503, True)
    assert e.retry_after_ms and e.retry_after_ms > 0


def test_pinned_pool_with_no_ready_replica_without_fallback() -> None:
    ps = two_pools()
    for r in ("r0", "r1"):
        ps.replicas[r].ready = False
    e = refused(targets, ps, {"mode": "pin", "pin_pool_id": "a", "allow_fallback": False})
    assert e.code is Code.POOL_UNREADY
    assert e.pool_id == "a" and "no ready replica" in e.message


def test_pin_with_fallback_lists_the_other_pools_after_it() -> None:
    ps = two_pools()
    assert ids(targets(ps, {"mode": "pin", "pin_pool_id": "b"})) == ["b", "a"]
    assert ids(targets(ps, {"mode": "pin", "pin_pool_id": "b", "allow_fallback": True})) == [
        "b",
        "a",
    ]
    # Fallback applies when the pinned pool cannot serve now, too.
    ps.pools["b"].draining = True
    assert ids(targets(ps, {"mode": "pin", "pin_pool_id": "b"})) == ["b", "a"]
    ps.replicas["r2"].ready = False
    ps.pools["b"].draining = False
    assert ids(targets(ps, {"mode": "pin", "pin_pool_id": "b"})) == ["b", "a"]


def test_pin_without_fallback_keeps_only_the_pinned_pool() -> None:
    ps = two_pools()
    assert ids(targets(ps, {"mode": "pin", "pin_pool_id": "b", "allow_fallback": False})) == ["b"]


def test_avoid_pools() -> None:
    ps = two_pools()
    assert ids(targets(ps, {"avoid_pools": ["a"]})) == ["b"]
    # Avoiding every pool: with fallback the avoidance yields, without it nothing is left.
    assert ids(targets(ps, {"avoid_pools": ["a", "b"]})) == ["a", "b"]
    e = refused(targets, ps, {"avoid_pools": ["a", "b"], "allow_fallback": False})
    assert e.code is Code.REPLICA_EXHAUSTED


def test_prefer_pools_ordering() -> None:
    ps = two_pools()
    assert ids(targets(ps)) == ["a", "b"]
    assert ids(targets(ps, {"prefer_pools": ["b"]})) == ["b", "a"]
    assert ids(targets(ps, {"prefer_pools": ["zz", "b", "a"]})) == ["b", "a"]
    assert ids(targets(ps, {"prefer_pools": ["a", "b"]})) == ["a", "b"]


def test_require_device_mask() -> None:
    ps = two_pools()
    e = refused(targets, ps, {"require_device_mask": "3,4"})
    assert e.code is Code.REPLICA_EXHAUSTED
    assert "3,4" in e.message
    assert ids(targets(ps, {"require_device_mask": "1"})) == ["a"]
    assert ids(targets(ps, {"require_device_mask": "2, 5"})) == ["b"]
    assert ids(targets(ps, {"require_device_mask": "0,1,2"})) == ["a", "b"]


def test_device_mask_excludes_replicas_with_no_devices() -> None:
    ps = make(pool("a"), reps=[rep("r0", "a", devices="")])
    assert refused(targets, ps, {"require_device_mask": "0"}).code is Code.REPLICA_EXHAUSTED


def test_every_pool_draining_is_pool_unavailable() -> None:
    ps = two_pools()
    ps.pools["a"].draining = True
    assert ids(targets(ps)) == ["a", "b"]  # b still serves
    ps.pools["b"].draining = True
    e = refused(targets, ps)
    assert e.code is Code.POOL_UNAVAILABLE and "draining" in e.message


def test_pools_not_ready_yet_still_accept_tasks() -> None:
    ps = make(pool("a"), reps=[rep("r0", "a", ready=False)])
    assert ids(targets(ps)) == ["a"]


# ---------------------------------------------------------------- choose


POLICY = make_policy("default")


def test_choose_first_pool_with_room() -> None:
    ps = two_pools()
    c = ps.choose(["a", "b"], M, None, POLICY)
    assert c is not None and c.replica.id == "r0"
    assert c.reason.startswith("preferred pool")
    c = ps.choose(["b", "a"], M, None, POLICY)
    assert c is not None and c.replica.id == "r2"


def test_choose_skips_draining_pools() -> None:
    ps = two_pools()
    ps.pools["a"].draining = True
    c = ps.choose(["a", "b"], M, None, POLICY)
    assert c is not None and c.replica.id == "r2"
    assert c.reason.startswith("fallback to pool b")
    ps.pools["b"].draining = True
    assert ps.choose(["a", "b"], M, None, POLICY) is None


def test_choose_skips_pools_serving_another_model() -> None:
    ps = two_pools()
    ps.pools["a"].model_ref = OTHER  # reloaded meanwhile
    c = ps.choose(["a", "b"], M, None, POLICY)
    assert c is not None and c.replica.id == "r2"
    assert ps.choose(["c"], M, None, POLICY) is None
    assert ps.choose(["zz"], M, None, POLICY) is None  # unknown pool ids are skipped


def test_choose_skips_full_and_unready_replicas() -> None:
    ps = two_pools()
    ps.replicas["r0"].active = {"x", "y"}
    c = ps.choose(["a"], M, None, POLICY)
    assert c is not None and c.replica.id == "r1"
    ps.replicas["r1"].ready = False
    c = ps.choose(["a", "b"], M, None, POLICY)
    assert c is not None and c.replica.id == "r2"
    ps.replicas["r2"].active = {"z", "w"}
    assert ps.choose(["a", "b"], M, None, POLICY) is None


def test_choose_respects_the_device_mask() -> None:
    ps = two_pools()
    c = ps.choose(["a", "b"], M, {"require_device_mask": "1"}, POLICY)
    assert c is not None and c.replica.id == "r1"
    c = ps.choose(["a", "b"], M, {"require_device_mask": "2"}, POLICY)
    assert c is not None and c.replica.id == "r2"
    assert ps.choose(["a", "b"], M, {"require_device_mask": "7"}, POLICY) is None


def test_choose_prefers_the_kv_warm_replica() -> None:
    ps = two_pools()
    c = ps.choose(["a"], M, None, POLICY, warm_replica="r1")
    assert c is not None and c.replica.id == "r1"
    assert "kv warm on r1" in c.reason
    # Unless it has no room: then the policy picks.
    ps.replicas["r1"].active = {"x", "y"}
    c = ps.choose(["a"], M, None, POLICY, warm_replica="r1")
    assert c is not None and c.replica.id == "r0"
    assert "kv warm" not in c.reason
    # A warm replica in a less preferred pool does not beat the preferred pool.
    ps.replicas["r1"].active = set()
    c = ps.choose(["a", "b"], M, None, POLICY, warm_replica="r2")
    assert c is not None and c.replica.pool_id == "a"


def test_choose_names_the_policy() -> None:
    ps = two_pools()
    c = ps.choose(["a"], M, None, make_policy("least-loaded"))
    assert c is not None and c.reason == "preferred pool; least-loaded"


# ---------------------------------------------------------------- versions and health


def test_accept_version_pins_the_first() -> None:
    ps = two_pools()
    r0, r1 = ps.replicas["r0"], ps.replicas["r1"]
    assert ps.accept_version(r0, "1.2.3") == ""
    assert ps.pools["a"].engine_version == "1.2.3"
    assert ps.accept_version(r1, "1.2.3") == ""
    refusal = ps.accept_version(r1, "9.9.9")
    assert "r1" in refusal and "9.9.9" in refusal and "1.2.3" in refusal
    assert ps.pools["a"].engine_version == "1.2.3"
    # Pools are pinned independently.
    assert ps.accept_version(ps.replicas["r2"], "9.9.9") == ""


def test_accept_version_configured_pin() -> None:
    ps = make(pool("a", engine_version="2.0"), reps=[rep("r0", "a")])
    assert ps.accept_version(ps.replicas["r0"], "1.0") != ""
    assert ps.accept_version(ps.replicas["r0"], "2.0") == ""


def test_accept_version_during_reload_takes_the_new_one() -> None:
    ps = two_pools()
    ps.accept_version(ps.replicas["r0"], "1.0")
    ps.pools["a"].reloading = True
    assert ps.accept_version(ps.replicas["r0"], "2.0") == ""
    assert ps.pools["a"].engine_version == "2.0"


def test_health_fields() -> None:
    ps = two_pools()
    ps.accept_version(ps.replicas["r0"], "1.0")
    ps.replicas["r0"].active = {"t1"}
    ps.replicas["r1"].ready = False
    ps.replicas["r1"].connected = False
    ps.replicas["r1"].last_error = "engine exited"
    h = ps.health("a", queued=3)
    assert set(h) == {"live", "ready", "draining", "metrics", "last_error"}
    assert (h["live"], h["ready"], h["draining"]) == (True, True, False)
    assert h["last_error"] == "engine exited"
    expected = {
        "replicas": 2,
        "ready_replicas": 1,
        "active_tasks": 1,
        "slots": 4,
        "queued_tasks": 3,
        "engine": "mock",
        "engine_version": "1.0",
        "model_ref": M,
        "sampler_profile_version": "v1",
        "version": 1,
        "reloading": False,
    }
    assert {k: h["metrics"].get(k) for k in expected} == expected
    # Anything else in metrics is an optional extra (the replicas' GPUs, each one's health).
    assert set(h["metrics"]) - set(expected) <= {"gpus", "replica_health"}
    ps.pools["a"].draining = True
    ps.pools["a"].last_error = "reload failed"
    h = ps.health("a", 0)
    assert (h["ready"], h["draining"], h["last_error"]) == (False, True, "reload failed")
    h = ps.health("b", 0)
    assert h["last_error"] is None
    for r in ("r0", "r1"):
        ps.replicas[r].ready = ps.replicas[r].connected = False
    h = ps.health("a", 0)
    assert (h["live"], h["ready"]) == (False, False)
    assert refused(ps.health, "zz", 0).code is Code.NOT_FOUND
