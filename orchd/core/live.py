"""The scheduler's state as an operator sees it: each replica's state and why it is not ready
(``/readyz``), and the live snapshot the operator page shows (``GET /v1/admin/live``).

Pure functions of the core and ``now``; a snapshot holds at most ``LIVE_MAX_TASKS`` active
tasks (the rest are counted), and one is computed at most every ``LIVE_CACHE_MS`` however many
pages watch (:class:`LiveView`).
"""

from __future__ import annotations

from typing import Any

from orchd.core.ownership import Stream
from orchd.core.placement import ReplicaView
from orchd.core.pools import PoolState
from orchd.core.queue import PRIORITIES
from orchd.core.scheduler import SchedulerCore
from orchd.core.tasks import State

LIVE_MAX_TASKS = 200  # active tasks listed in a snapshot; the rest are counted only
LIVE_CACHE_MS = 500  # a snapshot is reused by every page asking within this long
# A queued or running task's client holds its stream (an SSE connection, or a whole-body
# response being made). Once a task has ended the scheduler does not learn when its stream
# closes, so only active tasks' streams are counted.
CLIENT_STREAMS = frozenset({Stream.SUBSCRIBED, Stream.ATTACHED})


def replica_state(r: ReplicaView, pool: PoolState) -> tuple[str, str]:
    """``(state, why it cannot serve)``: state is ready, reloading (still serving), draining,
    starting, failed or down; the reason is "" when it can serve."""
    if not r.connected:
        if r.last_error:
            return "down", f"its supervisor is down: {r.last_error}"
        return "starting", "its supervisor has not connected yet"
    if not r.ready:
        if r.last_error:
            return "failed", f"its engine is not ready: {r.last_error}"
        return "starting", "its engine is starting"
    if pool.draining:
        return "draining", f"pool {pool.id} is draining"
    if pool.reloading:
        return "reloading", ""
    return "ready", ""


def readiness(core: SchedulerCore) -> tuple[bool, dict[str, Any]]:
    """Whether orchd can serve a task now (admitting, and one replica ready in a pool that is
    not draining), and which replicas cannot, with why."""
    not_ready = []
    ready = 0
    for pool in core.pools.pools.values():
        for rid in pool.replicas:
            state, why = replica_state(core.replicas[rid], pool)
            if why:
                not_ready.append(
                    {"replica_id": rid, "pool_id": pool.id, "state": state, "reason": why}
                )
            else:
                ready += 1
    ok = ready > 0 and core.admitting
    body: dict[str, Any] = {
        "ready": ok,
        "replicas": len(core.replicas),
        "ready_replicas": ready,
        "not_ready": not_ready,
    }
    if not core.admitting:
        body["reason"] = "orchd is shutting down: it admits no new task"
    elif not ready:
        body["reason"] = "no replica can serve a task"
    return ok, body


class LiveView:
    """Builds (and briefly reuses) the operator page's snapshot of a scheduler core."""

    def __init__(self, core: SchedulerCore, queue_capacity: int) -> None:
        self.core = core
        self.queue_capacity = queue_capacity
        self._cached: dict[str, Any] | None = None
        self._cached_at = float("-inf")

    def snapshot(self, now: float, wall_offset_ms: float, history: bool) -> dict[str, Any]:
        """The snapshot at ``now``; ``history``: with each GPU's last readings (a page's first
        frame; later frames carry the latest reading only)."""
        if self._cached is None or now - self._cached_at >= LIVE_CACHE_MS:
            self._cached = self._build(now, wall_offset_ms)
            self._cached_at = now
        return {**self._cached, "gpus": self.core.recent.gpus.view(history)}

    def _build(self, now: float, wall_offset_ms: float) -> dict[str, Any]:
        core = self.core
        queued: dict[str, dict[str, int]] = {
            pid: dict.fromkeys(PRIORITIES, 0) for pid in core.pools.pools
        }
        by_priority = dict.fromkeys(PRIORITIES, 0)
        active = []
        streams = 0
        for t in core.tasks.values():
            if t.state is State.ENDED:
                continue
            if t.stream in CLIENT_STREAMS:
                streams += 1
            if t.state is State.QUEUED:
                by_priority[t.spec.priority] = by_priority.get(t.spec.priority, 0) + 1
                if t.pools and t.pools[0] in queued:
                    lane = queued[t.pools[0]]
                    lane[t.spec.priority] = lane.get(t.spec.priority, 0) + 1
            active.append(t)
        active.sort(key=lambda t: t.enqueued_ms)
        tasks = []
        for t in active[:LIVE_MAX_TASKS]:
            running = t.state is State.RUNNING
            tasks.append(
                {
                    "task_id": t.spec.task_id,
                    "api_key_id": t.spec.api_key_id,
                    "state": t.state.value,
                    "priority": t.spec.priority,
                    "model_ref": t.model_ref,
                    "pool_id": core.replicas[t.replica].pool_id
                    if running
                    else (t.pools[:1] or [""])[0],
                    "replica_id": t.replica if running else "",
                    "stream": t.stream.value,
                    "client": t.stream in CLIENT_STREAMS,
                    "frontend": t.frontend if t.stream is not Stream.NONE else None,
                    "max_tokens": t.spec.max_tokens,
                    "queue_ms": round((t.started_ms if running else now) - t.enqueued_ms, 1),
                    "running_ms": round(now - t.started_ms, 1) if running else None,
                }
            )
        st = core.stats
        return {
            "at_ms": int(now + wall_offset_ms),
            "admitting": core.admitting,
            "ready": readiness(core)[0],
            "queue": {
                "depth": len(core.queue),
                "capacity": self.queue_capacity,
                "by_priority": by_priority,
                "policy": core.queue.policy,
            },
            "totals": {
                "enqueued": st.enqueued,
                "started": st.started,
                "tokens_in": st.tokens_in,
                "tokens_out": st.tokens_out,
                "rejected": sum(st.rejected.values()),
                "canceled": sum(st.canceled.values()),
            },
            "streams": {"open": streams},
            "pools": [self._pool(pool, queued[pool.id], now) for pool in core.pools.pools.values()],
            "tasks": tasks,
            "tasks_total": len(active),
            "recent": core.recent.view(wall_offset_ms),
        }

    def _pool(self, pool: PoolState, queued: dict[str, int], now: float) -> dict[str, Any]:
        core = self.core
        replicas: list[dict[str, Any]] = []
        for rid in pool.replicas:
            r = core.replicas[rid]
            state, why = replica_state(r, pool)
            window = core.recent.replicas.get(rid)
            rate = window.tokens_per_s(now) if window is not None else 0.0
            p50, p99 = window.ttft_ms(now) if window is not None else (None, None)
            replicas.append(
                {
                    "id": rid,
                    "state": state,
                    "reason": why,
                    "engine": r.engine,
                    "engine_version": r.engine_version,
                    "devices": r.devices,
                    "slots": r.slots,
                    "active": len(r.active),
                    "tokens_per_s": round(rate, 1),
                    "ttft_p50_ms": None if p50 is None else round(p50, 1),
                    "ttft_p99_ms": None if p99 is None else round(p99, 1),
                    "last_error": r.last_error,
                }
            )
        if pool.draining:
            state = "draining"
        elif pool.reloading:
            state = "reloading"
        elif any(r["state"] in ("ready", "reloading") for r in replicas):
            state = "ready"
        else:
            state = "unready"
        return {
            "id": pool.id,
            "state": state,
            "engine": pool.engine,
            "engine_version": pool.engine_version,
            "model_ref": pool.model_ref,
            "version": pool.version,
            "draining": pool.draining,
            "reloading": pool.reloading,
            "supported_workloads": list(pool.supported_workloads),
            "last_error": pool.last_error,
            "queued": queued,
            "slots": sum(r["slots"] for r in replicas),
            "active": sum(r["active"] for r in replicas),
            "tokens_per_s": round(sum(r["tokens_per_s"] for r in replicas), 1),
            "replicas": replicas,
        }
