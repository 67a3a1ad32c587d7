"""Control-plane and session operations on the scheduler core: pools (health, drain, atomic
reload), sessions, catalog, capabilities. Each ``op`` of a ``Query`` maps to one function here
(``OPS``); each returns ``(status, body)`` or raises an :class:`OrchdError`, and may add
messages to ``out``.

Reload is a two-phase switch across a pool's replicas: every supervisor prepares an engine
with the new model beside the serving one; only if all succeed do they commit (200), else the
prepared engines are dropped and the old model keeps serving (409 ``RELOAD_FAILED``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ipc import protocol as p
from ipc.peers import Peer
from orchd.core.catalog import parse_ref
from orchd.core.errors import Code, OrchdError
from orchd.core.live import LiveView, readiness
from orchd.core.scheduler import SchedulerCore
from orchd.core.tasks import Out, State, sup

API_VERSION = "1.0.0"
RELOAD_TIMEOUT_MS = 300_000

Result = tuple[int, Any]


@dataclass(slots=True)
class PendingReload:
    peer: str
    req_id: int
    pool_id: str
    model_ref: str
    started_ms: float
    waiting: set[str]
    ready: dict[str, str] = field(default_factory=dict)  # replica -> engine_version
    errors: dict[str, str] = field(default_factory=dict)


class Control:
    def __init__(self, core: SchedulerCore, ctx_max: int, max_tokens_out: int, queue_capacity: int):
        self.core = core
        self.ctx_max = ctx_max
        self.max_tokens_out = max_tokens_out
        self.queue_capacity = queue_capacity
        self.reloads: dict[int, PendingReload] = {}
        self.wall_offset_ms = 0.0  # wall clock minus `now`: catalog times are for humans
        self.started_ms: float | None = None  # when this scheduler first served (wall clock)
        self.live = LiveView(core, queue_capacity)

    # ---------------------------------------------------------------- dispatching a Query

    def handle(self, peer: str, q: p.Query, now: float) -> Out:
        out: Out = []
        op = OPS.get(q.op)
        try:
            if op is None:
                raise OrchdError(Code.INVALID_PARAMS, f"unknown operation {q.op!r}")
            res = op(self, peer, q, now, out)
        except OrchdError as e:
            return [(peer, p.Failed(q.req_id, self.core.error_info(e))), *out]
        if res is not None:
            out.insert(0, (peer, p.Reply(q.req_id, res[1], res[0])))
        return out

    # ---------------------------------------------------------------- pools

    def pool_health(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        pid = q.args["pool_id"]
        pool = self.core.pools.get(pid)
        queued = sum(
            1
            for t in self.core.tasks.values()
            if t.state is State.QUEUED and t.pools[:1] == [pool.id]
        )
        health = self.core.pools.health(pid, queued)
        # Drained: draining, and nothing runs there any more.
        health["drained"] = pool.draining and not self.core.running_on(pool.id)
        return 200, health

    def pool_drain(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        pool = self.core.pools.get(q.args["pool_id"])
        deadline_ms = int(q.args.get("deadline_ms", 0))
        pool.draining = True
        pool.drain_deadline_ms = now + deadline_ms
        out += self.core.dispatch(now)  # queued work may move to another pool serving the model
        running = len(self.core.running_on(pool.id))
        return 202, {
            "pool_id": pool.id,
            "draining": True,
            "deadline_ms": deadline_ms,
            "running": running,
        }

    def pool_undrain(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        """Back in service without a reload: placed on again at once."""
        pool = self.core.pools.get(q.args["pool_id"])
        pool.draining = False
        pool.drain_deadline_ms = None
        out += self.core.dispatch(now)
        return 200, self.pool_health(
            peer, p.Query(0, "pool.health", {"pool_id": pool.id}), now, out
        )[1]

    def pool_list(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        pools = []
        for pid in self.core.pools.pools:
            health = self.pool_health(peer, p.Query(0, "pool.health", {"pool_id": pid}), now, out)
            pools.append({"pool_id": pid, **health[1]})
        return 200, {"pools": pools}

    def pool_reload(self, peer: str, q: p.Query, now: float, out: Out) -> Result | None:
        pool = self.core.pools.get(q.args["pool_id"])
        ref = q.args["new_model_ref"]
        if pool.reloading:
            raise OrchdError(
                Code.RELOAD_FAILED, f"pool {pool.id} is already reloading", pool_id=pool.id
            )
        try:
            parse_ref(ref)
            canonical = self.core.catalog.check(ref)
        except OrchdError as e:
            raise OrchdError(
                Code.RELOAD_FAILED,
                f"reload of pool {pool.id} refused: {e.message}",
                pool_id=pool.id,
            ) from None
        live = [r for r in pool.replicas if self.core.replicas[r].connected]
        if not live:
            raise OrchdError(
                Code.RELOAD_FAILED, f"pool {pool.id} has no live replica", pool_id=pool.id
            )
        rid = self.core.next_id()
        pool.reloading = True
        self.reloads[rid] = PendingReload(peer, q.req_id, pool.id, canonical, now, set(live))
        for r in live:
            out.append((sup(r), p.ReloadPrepare(rid, canonical)))
        return None  # answered when every replica has prepared (or one failed)

    def reload_ready(self, peer: str, msg: p.ReloadReady, now: float) -> Out:
        rel = self.reloads.get(msg.req_id)
        replica = Peer(peer).replica_id
        if rel is None or replica not in rel.waiting:
            return []
        rel.waiting.discard(replica)
        if msg.ok:
            rel.ready[replica] = msg.engine_version
        else:
            rel.errors[replica] = msg.error
        return self._maybe_finish(msg.req_id, now) if not rel.waiting else []

    def _maybe_finish(self, rid: int, now: float) -> Out:
        rel = self.reloads.pop(rid)
        core = self.core
        pool = core.pools.pools[rel.pool_id]
        pool.reloading = False
        out: Out = []
        versions = set(rel.ready.values())
        if not rel.errors and len(versions) > 1:
            # Committing would leave replicas on different engine versions in one pool.
            rel.errors["pool"] = f"replicas came up on different engine versions {sorted(versions)}"
        if rel.errors:
            for r in rel.ready:
                out.append((sup(r), p.ReloadAbort(rid)))
            why = "; ".join(f"{r}: {e}" for r, e in sorted(rel.errors.items()))
            pool.last_error = f"reload to {rel.model_ref} failed: {why}"
            failure = OrchdError(
                Code.RELOAD_FAILED,
                f"reload of pool {pool.id} to {rel.model_ref} failed; still serving "
                f"{pool.model_ref}: {why}",
                pool_id=pool.id,
            )
            out.append((rel.peer, p.Failed(rel.req_id, core.error_info(failure))))
            return out
        for r in rel.ready:
            out.append((sup(r), p.ReloadCommit(rid)))
        old = pool.model_ref
        pool.model_ref = rel.model_ref
        pool.engine_version = next(iter(rel.ready.values()), pool.engine_version)
        pool.version += 1
        pool.draining = False
        pool.drain_deadline_ms = None
        pool.last_error = ""
        # Queued tasks that asked for the old model and have nowhere else to go.
        err = p.ErrorInfo(
            Code.POOL_UNAVAILABLE.value, f"model {old} is no longer served by pool {pool.id}"
        )
        for t in list(core.tasks.values()):
            if t.state is State.QUEUED and not any(
                core.pools.pools[x].model_ref == t.model_ref for x in t.pools
            ):
                core.fail_task(t, err, now, out)
        body = {"pool_id": pool.id, "model_ref": pool.model_ref, "version": pool.version}
        out.append((rel.peer, p.Reply(rel.req_id, body, 200)))
        out += core.dispatch(now)
        return out

    def tick(self, now: float) -> Out:
        out: Out = []
        for m in self.core.catalog.overdue(now + self.wall_offset_ms):
            late = [
                t
                for t in self.core.tasks.values()
                if t.state is State.RUNNING and t.model_ref in (m.ref, m.id)
            ]
            out += self.core.abort_tasks(late, "model_retired", now)
        for rid, rel in list(self.reloads.items()):
            if now - rel.started_ms > RELOAD_TIMEOUT_MS:
                for r in rel.waiting:
                    rel.errors[r] = "no answer from its supervisor"
                rel.waiting.clear()
                out += self._maybe_finish(rid, now)
        return out

    def peer_down(self, ident: str) -> Out:
        out: Out = []
        replica = Peer(ident).replica_id
        for rid, rel in list(self.reloads.items()):
            if replica in rel.waiting:
                rel.waiting.discard(replica)
                rel.errors[replica] = "supervisor died during the reload"
                if not rel.waiting:
                    out += self._maybe_finish(rid, 0.0)
        return out

    # ---------------------------------------------------------------- the operator's view

    def ready(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        """``GET /readyz``: 200 when a replica can serve, else 503; which cannot, and why."""
        ok, body = readiness(self.core)
        return (200 if ok else 503), body

    def admin_live(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        """The operator page's snapshot (orchd/core/live.py)."""
        return 200, self.live.snapshot(now, self.wall_offset_ms, bool(q.args.get("history")))

    # ---------------------------------------------------------------- sessions

    def session_get(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        s = self.core.sessions.get(q.args["session_id"], now)
        if s is None or s.owner != q.key:
            raise OrchdError(Code.NOT_FOUND, f"no session {q.args['session_id']!r}")
        warm = (
            bool(s.last_replica)
            and self.core.replicas.get(s.last_replica) is not None
            and (self.core.replicas[s.last_replica].ready)
        )
        return 200, self.core.sessions.view(s, now, warm)

    def session_delete(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        s = self.core.sessions.get(q.args["session_id"], now)
        if s is None or s.owner != q.key:
            raise OrchdError(Code.NOT_FOUND, f"no session {q.args['session_id']!r}")
        self.core.sessions.delete(s.id)
        return 204, None

    # ---------------------------------------------------------------- catalog

    def catalog_create(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        return 201, self.core.catalog.register(q.args, now + self.wall_offset_ms).view()

    def catalog_get(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        return 200, self.core.catalog.get(q.args["model_id"]).view()

    def catalog_delete(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        self.core.catalog.delete(q.args["model_id"])
        return 204, None

    def catalog_state(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        deadline = q.args.get("deadline_ms")
        m = self.core.catalog.set_state(
            q.args["model_id"], q.args.get("state"), now + self.wall_offset_ms, deadline
        )
        return 202, m.view()

    def catalog_list(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        return 200, {"models": self.core.catalog.listing()}

    # ---------------------------------------------------------------- tasks

    def progress(self, tokens: dict[str, int]) -> None:
        """A supervisor's heartbeat: tokens so far of the tasks it runs."""
        for tid, n in tokens.items():
            t = self.core.tasks.get(tid)
            if t is not None and t.state is State.RUNNING:
                t.tokens_out = n

    def task_get(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        """A task's state for its owner, without a stream: queued (and where), running (and
        where), or ended (and why)."""
        t = self.core.tasks.get(q.args["task_id"])
        if t is None or t.spec.api_key_id != q.key:
            raise OrchdError(Code.NOT_FOUND, f"no task {q.args['task_id']!r}")
        body: dict[str, Any] = {"task_id": t.spec.task_id, "state": t.state.value}
        if t.state is State.QUEUED:
            body["queue_position"] = self.core.queue.position(t.spec.task_id) or 1
        elif t.state is State.RUNNING:
            rep = self.core.replicas.get(t.replica)
            body["pool_id"] = rep.pool_id if rep is not None else ""
            body["replica_id"] = t.replica
            body["running_ms"] = max(0, int(now - t.started_ms))
            body["tokens_out"] = t.tokens_out
        else:
            body["reason"] = t.end_reason or ("error" if t.error else "")
            body["tokens_out"] = t.tokens_out
            if t.error is not None:
                body["error_code"] = t.error.code
        return 200, body

    def catalog_verify(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        m = self.core.catalog.get(q.args["model_id"])
        # The shell computes the digest off the loop and records it (202: accepted).
        body = {"id": m.id, "verification": "started"}
        if m.ref:
            body["ref"] = m.ref
        return 202, body

    # ---------------------------------------------------------------- capabilities

    def capabilities(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        engines = []
        for pool in self.core.pools.pools.values():
            reps = [self.core.replicas[r] for r in pool.replicas]
            engines.append(
                {
                    "engine": pool.engine,
                    "engine_version": pool.engine_version or "unknown",
                    "pool_id": pool.id,
                    "model_ref": pool.model_ref,
                    "sampler_profile_version": pool.sampler_profile_version,
                    "ctx_max": self.ctx_max,
                    "max_tokens_out": self.max_tokens_out,
                    "supported_workloads": list(pool.supported_workloads),
                    "concurrency": sum(r.slots for r in reps),
                    "rate_limits": {"queue_capacity": self.queue_capacity},
                    "features": {
                        "seeded_determinism": True,
                        "cancel": True,
                        "sessions": True,
                        "budgets": ["tokens", "time", "cost"],
                        "placement_overrides": ["pin", "prefer", "avoid", "device_mask"],
                        "queue_policy": self.core.queue.policy,
                    },
                }
            )
        return 200, {"api_version": API_VERSION, "engines": engines}

    def models(self, peer: str, q: p.Query, now: float, out: Out) -> Result:
        """The models the pools serve, as OpenAI's ``GET /v1/models`` lists them: by catalog
        id where the catalog names the pool's model, else by model ref."""
        if self.started_ms is None:
            self.started_ms = now + self.wall_offset_ms
        by_ref = {m.ref: m for m in self.core.catalog.models.values() if m.state == "Active"}
        seen: dict[str, dict[str, Any]] = {}
        for pool in self.core.pools.pools.values():
            m = by_ref.get(pool.model_ref)
            mid = m.id if m is not None else pool.model_ref
            created = (m.created_ms if m is not None and m.created_ms else self.started_ms) // 1000
            entry = seen.setdefault(
                mid,
                {
                    "id": mid,
                    "object": "model",
                    "created": int(created),
                    "owned_by": "orchd",
                    "root": pool.model_ref,
                    "pools": [],
                },
            )
            entry["pools"].append(pool.id)
        return 200, {"object": "list", "data": list(seen.values())}


OPS: dict[str, Callable[[Control, str, p.Query, float, Out], Result | None]] = {
    "pool.health": Control.pool_health,
    "pool.drain": Control.pool_drain,
    "pool.reload": Control.pool_reload,
    "pool.undrain": Control.pool_undrain,
    "pool.list": Control.pool_list,
    "task.get": Control.task_get,
    "catalog.list": Control.catalog_list,
    "ready": Control.ready,
    "admin.live": Control.admin_live,
    "session.get": Control.session_get,
    "session.delete": Control.session_delete,
    "catalog.create": Control.catalog_create,
    "catalog.get": Control.catalog_get,
    "catalog.delete": Control.catalog_delete,
    "catalog.state": Control.catalog_state,
    "catalog.verify": Control.catalog_verify,
    "capabilities": Control.capabilities,
    "models.list": Control.models,
}
