"""Pools of replicas and where a task may run: version pinning, drain state, placement
constraints (pin, prefer, avoid, device mask, fallback), and the truth behind
``POOL_UNREADY`` / ``POOL_UNAVAILABLE`` / ``REPLICA_EXHAUSTED``."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from orchd.core.errors import Code, OrchdError
from orchd.core.placement import Policy, ReplicaView

# Retry-After of POOL_UNREADY: an engine that failed to start is retried with backoff; with its
# circuit open, not before the breaker's cool-down (orchd/core/restart.py).
UNREADY_RETRY_MS = 1_000
UNREADY_RETRY_OPEN_MS = 30_000


@dataclass(slots=True)
class PoolState:
    id: str
    engine: str
    model_ref: str
    engine_version: str  # "" until the first replica reports (then pinned)
    sampler_profile_version: str
    supported_workloads: list[str]
    kv_bytes_per_token: int
    replicas: list[str] = field(default_factory=list)
    chat: bool = True  # its engine renders chat turns with a chat template of its own
    draining: bool = False
    drain_deadline_ms: float | None = None
    reloading: bool = False
    version: int = 1
    last_error: str = ""


@dataclass(slots=True)
class Choice:
    replica: ReplicaView
    reason: str


def _devices(spec: str) -> set[str]:
    return {d.strip() for d in spec.split(",") if d.strip()}


class Pools:
    def __init__(self, pools: Iterable[PoolState], replicas: dict[str, ReplicaView]) -> None:
        self.pools = {p.id: p for p in pools}
        self.replicas = replicas
        for r in replicas.values():
            pool = self.pools[r.pool_id]
            if r.id not in pool.replicas:
                pool.replicas.append(r.id)

    def get(self, pool_id: str) -> PoolState:
        p = self.pools.get(pool_id)
        if p is None:
            raise OrchdError(Code.NOT_FOUND, f"no pool {pool_id!r}")
        return p

    def serving(self, engine: str, model_ref: str) -> list[PoolState]:
        """Pools of ``model_ref`` on ``engine`` ("" = on any engine: the OpenAI routes)."""
        return [
            p
            for p in self.pools.values()
            if p.model_ref == model_ref and (not engine or p.engine == engine)
        ]

    def accept_version(self, r: ReplicaView, version: str) -> str:
        """Pin the pool's engine_version to the first one reported; '' or the refusal."""
        pool = self.pools[r.pool_id]
        if not pool.engine_version or pool.reloading:
            pool.engine_version = version
            return ""
        if version != pool.engine_version:
            return (
                f"replica {r.id} runs engine_version {version} but pool {pool.id} is pinned "
                f"to {pool.engine_version}; refusing to mix versions"
            )
        return ""

    # ---------------------------------------------------------------- admission checks

    def targets(
        self,
        engine: str,
        model_ref: str,
        workload: str,
        placement: dict[str, Any] | None,
        sampler_profile_version: str | None = None,
    ) -> list[PoolState]:
        """Pools a task may use, most preferred first; raises the typed reason if none."""
        pl = placement or {}
        pools = self.serving(engine, model_ref)
        if not pools:
            if not engine:  # the OpenAI routes: an unknown model is a 404
                served = sorted({p.model_ref for p in self.pools.values()})
                raise OrchdError(
                    Code.NOT_FOUND,
                    f"model {model_ref!r} is not served here (served: {', '.join(served)})",
                    param="model",
                )
            served = sorted({f"{p.engine}/{p.model_ref}" for p in self.pools.values()})
            raise OrchdError(
                Code.INVALID_PARAMS,
                f"model_ref: no pool serves {engine}/{model_ref} (served: {', '.join(served)})",
            )
        able = [p for p in pools if workload in p.supported_workloads]
        if not able:
            which = ", ".join(f"pool {p.id}'s {p.engine} engine" for p in pools)
            raise OrchdError(
                Code.INVALID_PARAMS,
                f"workload: {which} cannot do {workload!r} (it does "
                f"{', '.join(pools[0].supported_workloads)})",
                param="model",
            )
        pools = able
        if sampler_profile_version is not None:
            pools = [p for p in pools if p.sampler_profile_version == sampler_profile_version]
            if not pools:
                raise OrchdError(
                    Code.INVALID_PARAMS,
                    f"sampler_profile_version: no pool serving {model_ref} runs sampler "
                    f"profile {sampler_profile_version!r}",
                )
        fallback = bool(pl.get("allow_fallback", True))
        if pl.get("mode") == "pin":
            pin = pl.get("pin_pool_id")
            if not pin:
                raise OrchdError(
                    Code.INVALID_PARAMS, "placement.pin_pool_id is required with mode pin"
                )
            pinned = self.pools.get(pin)
            if pinned is None:
                raise OrchdError(Code.INVALID_PARAMS, f"placement.pin_pool_id: no pool {pin!r}")
            if pinned not in pools:
                raise OrchdError(
                    Code.INVALID_PARAMS,
                    f"placement.pin_pool_id: pool {pin} does not serve {engine}/{model_ref}",
                )
            others = [p for p in pools if p is not pinned] if fallback else []
            if not others:
                self._usable_or_raise(pinned)
            pools = [pinned, *others]
        avoid = set(pl.get("avoid_pools") or [])
        if avoid:
            kept = [p for p in pools if p.id not in avoid]
            if kept or not fallback:
                pools = kept
        prefer = pl.get("prefer_pools") or []
        if prefer:
            rank = {pid: i for i, pid in enumerate(prefer)}
            pools.sort(key=lambda p: rank.get(p.id, len(rank)))
        mask = pl.get("require_device_mask")
        if mask is not None:
            allowed = _devices(str(mask))
            fits = [
                p
                for p in pools
                if any(
                    _devices(self.replicas[r].devices)
                    and _devices(self.replicas[r].devices) <= allowed
                    for r in p.replicas
                )
            ]
            if not fits:
                raise OrchdError(
                    Code.REPLICA_EXHAUSTED,
                    f"no replica serving {model_ref} runs within devices {{{mask}}}",
                )
            pools = fits
        if not pools:
            raise OrchdError(
                Code.REPLICA_EXHAUSTED, f"placement constraints leave no pool for {model_ref}"
            )
        if not any(self._usable(p) for p in pools):
            if all(p.draining for p in pools):
                raise OrchdError(
                    Code.POOL_UNAVAILABLE,
                    f"every pool serving {model_ref} is draining",
                    pool_id=pools[0].id,
                    retry_after_ms=1000,
                )
            self._unless_loadable(pools, model_ref)
        return pools

    def _unless_loadable(self, pools: list[PoolState], model_ref: str) -> None:
        """Refuse a task none of whose pools can become ready on its own: every replica's
        engine fails to load (or its circuit is open), or the pool drains. A replica still
        starting, or restarting after a crash, may serve soon: the task waits for it."""
        for p in pools:
            if p.draining:
                continue
            if not all(self.replicas[r].cannot_load for r in p.replicas):
                return
        live = [p for p in pools if not p.draining] or pools
        reps = [self.replicas[r] for p in live for r in p.replicas]
        why = next((r.last_error for r in reps if r.last_error), "its engine fails to start")
        retry = UNREADY_RETRY_OPEN_MS if all(r.circuit_open for r in reps) else UNREADY_RETRY_MS
        raise OrchdError(
            Code.POOL_UNREADY,
            f"no pool serving {model_ref} can load it now: {why}",
            pool_id=live[0].id,
            retry_after_ms=retry,
        )

    def _usable(self, p: PoolState) -> bool:
        return not p.draining and any(self.replicas[r].usable for r in p.replicas)

    def _usable_or_raise(self, p: PoolState) -> None:
        if p.draining:
            raise OrchdError(
                Code.POOL_UNAVAILABLE, f"pool {p.id} is draining", pool_id=p.id, retry_after_ms=1000
            )
        if not any(self.replicas[r].usable for r in p.replicas):
            raise OrchdError(
                Code.POOL_UNREADY,
                f"pool {p.id} has no ready replica",
                pool_id=p.id,
                retry_after_ms=1000,
            )

    # ---------------------------------------------------------------- dispatch

    def choose(
        self,
        pool_ids: list[str],
        model_ref: str,
        placement: dict[str, Any] | None,
        policy: Policy,
        warm_replica: str = "",
    ) -> Choice | None:
        """A replica with a free slot in the first pool (by preference) that has one."""
        mask = (placement or {}).get("require_device_mask")
        allowed = _devices(str(mask)) if mask is not None else None
        for i, pid in enumerate(pool_ids):
            p = self.pools.get(pid)
            if p is None or p.draining or p.model_ref != model_ref:
                continue
            cands = [
                self.replicas[r]
                for r in p.replicas
                if self.replicas[r].usable
                and self.replicas[r].free_slots > 0
                and (allowed is None or (_devices(self.replicas[r].devices) or {"-"}) <= allowed)
            ]
            if not cands:
                continue
            why = "preferred pool" if i == 0 else f"fallback to pool {p.id}"
            for c in cands:
                if c.id == warm_replica:
                    return Choice(c, f"{why}; kv warm on {c.id}")
            return Choice(policy(cands), f"{why}; {policy_name(policy)}")
        return None

    # ---------------------------------------------------------------- health

    def health(self, pool_id: str, queued: int) -> dict[str, Any]:
        p = self.get(pool_id)
        reps = [self.replicas[r] for r in p.replicas]
        ready = [r for r in reps if r.usable]
        return {
            # live: some supervisor of it runs and answers (a paused one is not live).
            "live": any(r.connected and r.responsive for r in reps),
            "ready": bool(ready) and not p.draining,
            "draining": p.draining,
            "metrics": {
                "replicas": len(reps),
                "ready_replicas": len(ready),
                "active_tasks": sum(len(r.active) for r in reps),
                "slots": sum(r.slots for r in reps),
                "queued_tasks": queued,
                "engine": p.engine,
                "engine_version": p.engine_version,
                "model_ref": p.model_ref,
                "sampler_profile_version": p.sampler_profile_version,
                "version": p.version,
                "reloading": p.reloading,
                "gpus": [g for r in reps for g in r.gpus],
                "replica_health": [
                    {
                        "replica_id": r.id,
                        "live": r.connected and r.responsive,
                        "ready": r.usable,
                        "last_error": r.last_error or None,
                        "last_down": r.last_down or None,
                    }
                    for r in reps
                ],
            },
            "last_error": p.last_error or next((r.last_error for r in reps if r.last_error), None),
        }


def policy_name(policy: Policy) -> str:
    return getattr(policy, "name", getattr(policy, "__name__", "policy")).strip("_")
