"""Placement (orchd/core/placement.py)."""

from __future__ import annotations

import pytest

from orchd.core.placement import ReplicaView, eligible, make_policy


def rv(
    id: str,
    *,
    slots: int = 2,
    active: int = 0,
    ready: bool = True,
    draining: bool = False,
    engine: str = "mock",
    vram: int = 0,
) -> ReplicaView:
    return ReplicaView(
        id=id,
        pool_id="p",
        engine=engine,
        slots=slots,
        active={f"{id}-t{i}" for i in range(active)},
        ready=ready,
        draining=draining,
        free_vram_bytes=vram,
    )


def ids(rs: list[ReplicaView]) -> list[str]:
    return [r.id for r in rs]


def test_free_slots() -> None:
    assert rv("a", slots=4, active=1).free_slots == 3
    assert rv("a", slots=2, active=2).free_slots == 0


def test_eligible_filters() -> None:
    reps = [
        rv("ok"),
        rv("unready", ready=False),
        rv("draining", draining=True),
        rv("other-engine", engine="vllm"),
        rv("full", slots=2, active=2),
        rv("ok2", slots=3, active=2),
    ]
    assert ids(eligible(reps, "mock")) == ["ok", "ok2"]
    assert ids(eligible(reps, "vllm")) == ["other-engine"]
    assert eligible(reps, "tgi") == []
    assert eligible([], "mock") == []


def test_replica_view_default_is_not_ready() -> None:
    assert eligible([ReplicaView(id="r", pool_id="p", engine="mock", slots=1)], "mock") == []


def test_default_policy_prefers_most_free_vram() -> None:
    pick = make_policy("default")
    cands = [rv("a", vram=10, active=0), rv("b", vram=30, active=1), rv("c", vram=20)]
    assert pick(cands).id == "b"


def test_default_policy_then_fewest_active_then_id() -> None:
    pick = make_policy("default")
    assert pick([rv("a", active=1), rv("b", active=0), rv("c", active=1)]).id == "b"
    assert pick([rv("z"), rv("y"), rv("x", active=1)]).id == "y"
    assert pick([rv("r1", vram=5), rv("r0", vram=5)]).id == "r0"


def test_least_loaded_uses_fraction_of_slots() -> None:
    pick = make_policy("least-loaded")
    # a: 2/8 busy, b: 1/2 busy, c: 1/4 busy -> a (0.25) ties c (0.25) -> id
    assert (
        pick(
            [rv("b", slots=2, active=1), rv("c", slots=4, active=1), rv("a", slots=8, active=2)]
        ).id
        == "a"
    )
    assert pick([rv("b", slots=2, active=1), rv("c", slots=4, active=0)]).id == "c"
    # Free VRAM does not matter to it.
    assert pick([rv("a", active=1, vram=100), rv("b", vram=0)]).id == "b"


def test_round_robin_cycles_by_id() -> None:
    pick = make_policy("round-robin")
    cands = [rv("r2"), rv("r0"), rv("r1")]
    assert [pick(cands).id for _ in range(7)] == ["r0", "r1", "r2", "r0", "r1", "r2", "r0"]


def test_round_robin_skips_missing_candidates() -> None:
    pick = make_policy("round-robin")
    assert pick([rv("r0"), rv("r1"), rv("r2")]).id == "r0"
    # r1 is busy now: the turn passes to r2, then wraps.
    assert pick([rv("r0"), rv("r2")]).id == "r2"
    assert pick([rv("r0"), rv("r1")]).id == "r0"
    assert pick([rv("r0"), rv("r1")]).id == "r1"


def test_round_robin_instances_are_independent() -> None:
    a, b = make_policy("round-robin"), make_policy("round-robin")
    cands = [rv("r0"), rv("r1")]
    assert a(cands).id == "r0"
    assert a(cands).id == "r1"
    assert b(cands).id == "r0"


def test_make_policy_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown placement policy 'random'"):
        make_policy("random")
