"""Placement: which replica runs a task. Policies are picked by name from ``POLICIES``.

Only replicas that are usable (ready, their supervisor heard lately), not draining, serve the
task's engine and have a free slot are candidates. The default policy sorts by most free VRAM, then fewest active slots, then id.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass(slots=True)
class ReplicaView:
    id: str
    pool_id: str
    engine: str
    slots: int
    active: set[str] = field(default_factory=set)
    ready: bool = False
    draining: bool = False
    free_vram_bytes: int = 0
    engine_version: str = ""
    last_error: str = ""
    devices: str = ""  # CUDA_VISIBLE_DEVICES of its engine
    connected: bool = False  # its supervisor process is up
    gpus: list[dict[str, object]] = field(default_factory=list)  # NVML view of its devices
    # Its supervisor was heard within a few heartbeats (the scheduler's shell keeps it).
    responsive: bool = True
    start_failures: int = 0  # its engine's failed starts in a row (0 once it is ready)
    circuit_open: bool = False  # its engine's restart circuit breaker is open
    last_down: str = ""  # why its supervisor was last taken as dead (kept after it is back)

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.active)

    @property
    def usable(self) -> bool:
        """Ready and heard from: a task placed on it now would run."""
        return self.ready and self.responsive

    @property
    def cannot_load(self) -> bool:
        """Not ready because its engine fails to start (or its circuit is open), as opposed
        to still starting or briefly restarting after a crash."""
        return not self.ready and (self.start_failures > 0 or self.circuit_open)


def eligible(replicas: Sequence[ReplicaView], engine: str) -> list[ReplicaView]:
    return [
        r
        for r in replicas
        if r.usable and not r.draining and r.engine == engine and r.free_slots > 0
    ]


Policy = Callable[[list[ReplicaView]], ReplicaView]


def _default(cands: list[ReplicaView]) -> ReplicaView:
    return min(cands, key=lambda r: (-r.free_vram_bytes, len(r.active), r.id))


def _least_loaded(cands: list[ReplicaView]) -> ReplicaView:
    return min(cands, key=lambda r: (len(r.active) / r.slots, r.id))


_default.name = "default: most free VRAM, fewest active, id"  # type: ignore[attr-defined]
_least_loaded.name = "least-loaded"  # type: ignore[attr-defined]


class _RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._last = ""

    def __call__(self, cands: list[ReplicaView]) -> ReplicaView:
        ordered = sorted(cands, key=lambda r: r.id)
        for r in ordered:
            if r.id > self._last:
                self._last = r.id
                return r
        self._last = ordered[0].id
        return ordered[0]


# Keyed by the names orchd.config.PlacementPolicy accepts (tests/unit/test_config_tables.py).
POLICIES: dict[str, Callable[[], Policy]] = {
    "default": lambda: _default,
    "least-loaded": lambda: _least_loaded,
    "round-robin": _RoundRobin,
}


def make_policy(name: str) -> Policy:
    try:
        return POLICIES[name]()
    except KeyError:
        raise ValueError(f"unknown placement policy {name!r}; known: {sorted(POLICIES)}") from None
