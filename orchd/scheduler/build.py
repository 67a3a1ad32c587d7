"""Build the scheduler core from the config: replicas, pools, sessions, catalog, weights."""

from __future__ import annotations

from orchd.config import CHAT_ADAPTERS, EMBEDDING_ADAPTERS, Config, Pool
from orchd.core.catalog import Catalog
from orchd.core.control import Control
from orchd.core.placement import ReplicaView
from orchd.core.pools import PoolState
from orchd.core.scheduler import SchedulerCore
from orchd.core.sessions import Limits, SessionTable
from orchd.keys import key_id


def _limits(tokens: int, time_ms: int, cost: float) -> Limits:
    return Limits(tokens or None, float(time_ms) if time_ms else None, cost or None)


def _pool(cfg: Config, p: Pool) -> PoolState:
    """A pool as the core sees it: what its engine can do comes from its replicas' adapter."""
    adapters = {r.adapter_name for r in cfg.replicas if r.pool_id == p.id}
    workloads = list(p.supported_workloads)
    if adapters and adapters <= EMBEDDING_ADAPTERS and "embedding" not in workloads:
        workloads.append("embedding")
    state = PoolState(
        p.id,
        p.engine,
        p.model_ref,
        p.engine_version,
        p.sampler_profile_version,
        workloads,
        p.kv_bytes_per_token,
    )
    state.chat = bool(adapters) and adapters <= CHAT_ADAPTERS
    return state


def build_core(cfg: Config) -> tuple[SchedulerCore, Control]:
    replicas = [
        ReplicaView(r.id, r.pool_id, r.engine, r.slots, devices=r.devices) for r in cfg.replicas
    ]
    pools = [_pool(cfg, p) for p in cfg.all_pools()]
    ss = cfg.sessions
    b = ss.session_budget
    sessions = SessionTable(
        ttl_ms=ss.ttl_ms,
        max_turns=ss.max_turns,
        cost_per_token=ss.cost_per_token,
        default=_limits(b.tokens, b.time_ms, b.cost),
        per_key={
            key_id(k): _limits(v.tokens, v.time_ms, v.cost) for k, v in ss.key_budgets.items()
        },
    )
    core = SchedulerCore(
        replicas,
        pools,
        queue_capacity=cfg.limits.queue_capacity,
        queue_policy=cfg.scheduling.queue_policy,
        placement=cfg.scheduling.placement,
        retention_ms=cfg.limits.transcript_retention_ms,
        key_weights={key_id(k): w for k, w in cfg.scheduling.key_weights.items()},
        sessions=sessions,
        catalog=Catalog(cfg.catalog.trust_policy, cfg.catalog.signing_keys),
        cost_per_token=ss.cost_per_token,
        resume_grace_ms=cfg.limits.resume_grace_ms,
    )
    control = Control(
        core, cfg.limits.ctx_limit, cfg.limits.max_tokens_limit, cfg.limits.queue_capacity
    )
    return core, control
