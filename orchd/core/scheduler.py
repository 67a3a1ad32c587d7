"""The scheduler's state machine: admission, dispatch, task ends, failures, shutdown.

Every entry point takes a message (and ``now`` in ms) and returns the messages to send, as
``(peer, message)`` pairs. The shell (``orchd/scheduler/loop.py``) only moves bytes.
Who streams a task and how cancels are answered is ``orchd/core/streams.py``; what becomes of
queued tasks past their deadline and of a replica taken back, ``orchd/core/liveness_ops.py``;
control-plane operations (pools, sessions, catalog) are ``orchd/core/control.py``.

Peers are named ``fe<N>`` (frontend N), ``sup-<replica id>`` and ``launcher``.
"""

from __future__ import annotations

import itertools
from collections import deque

from ipc import protocol as p
from orchd.core.catalog import Catalog
from orchd.core.errors import Code, OrchdError
from orchd.core.eta import ServiceTime
from orchd.core.journal import Admit, End, Record, Start
from orchd.core.liveness_ops import LivenessOps
from orchd.core.ownership import FED, Ev, Stream, step
from orchd.core.placement import ReplicaView, make_policy
from orchd.core.pools import Pools, PoolState
from orchd.core.queue import PRIORITIES, AdmissionQueue, QueueFull
from orchd.core.recent import Recent
from orchd.core.series import Series, outcome, pinned, pool_of, where_of
from orchd.core.sessions import SessionTable
from orchd.core.streams import StreamOps
from orchd.core.tasks import Out, State, Stats, Task, sup


class SchedulerCore(StreamOps, LivenessOps):
    def __init__(
        self,
        replicas: list[ReplicaView],
        pools: list[PoolState] | None = None,
        *,
        queue_capacity: int,
        queue_policy: str = "reject",
        placement: str = "default",
        retention_ms: int = 60_000,
        key_weights: dict[str, float] | None = None,
        sessions: SessionTable | None = None,
        catalog: Catalog | None = None,
        cost_per_token: float = 0.0,
        resume_grace_ms: int = 10_000,
    ) -> None:
        self.replicas = {r.id: r for r in replicas}
        if pools is None:
            pools = []
            for r in replicas:
                if r.pool_id not in {x.id for x in pools}:
                    pools.append(
                        PoolState(r.pool_id, r.engine, "mock:tiny", "", "v1", ["completion"], 1024)
                    )
        self.pools = Pools(pools, self.replicas)
        self.queue: AdmissionQueue[None] = AdmissionQueue(queue_capacity, queue_policy, key_weights)
        self.place = make_policy(placement)
        self.sessions = sessions or SessionTable()
        self.catalog = catalog or Catalog()
        self.cost_per_token = cost_per_token
        self.tasks: dict[str, Task] = {}
        self.service = ServiceTime()  # dispatch to end
        self.ttft = ServiceTime(prior_ms=0.0)
        self.tpot = ServiceTime(prior_ms=0.0)  # per token after the first
        self.stats = Stats()
        self.series = Series.configured(replicas, self.pools.pools.values(), PRIORITIES)
        self.recent = Recent({r.id: r.pool_id for r in replicas})  # for the operator page
        self.retention_ms = retention_ms
        self.admitting = True
        self._ids = itertools.count(1)
        self._aborts: dict[int, str] = {}  # abort req id -> task id
        self._fences: dict[int, str] = {}  # fence req id -> task id
        self._detached: dict[str, tuple[float, str]] = {}  # (grace end ms, why); streams.py
        self.resume_grace_ms = resume_grace_ms
        self._ended: deque[tuple[float, str]] = deque()  # (ended_ms, task id), for retention
        self._drain: tuple[str, int, float] | None = None  # (peer, req id, deadline ms)
        # replica -> tasks it ran when taken as dead (failed then); aborted if it comes back
        self._orphans: dict[str, list[str]] = {}
        # Durability (orchd/core/journal.py, orchd/core/recovery.py): what the journal is to
        # record (the shell takes it each loop turn), wall clock minus `now`, the started
        # tasks a restarted core waits to hear of from their supervisor (task id -> replica),
        # and whether a drain past its deadline keeps the queued tasks for the next start.
        self.records: list[Record] = []
        self.wall_offset_ms = 0.0
        self.adopting: dict[str, str] = {}
        self.adopt_until = 0.0  # when the supervisors have had their time to re-announce
        self.parked = False

    def next_id(self) -> int:
        return next(self._ids)

    # ------------------------------------------------------------------ helpers

    def _slots(self, pool_ids: list[str]) -> tuple[int, int]:
        total = free = 0
        for pid in pool_ids:
            pool = self.pools.pools[pid]
            if pool.draining:
                continue
            for rid in pool.replicas:
                r = self.replicas[rid]
                if r.usable:
                    total += r.slots
                    free += r.free_slots
        return total, free

    @staticmethod
    def error_info(e: OrchdError) -> p.ErrorInfo:
        return p.ErrorInfo(
            e.code.value,
            e.message,
            engine=e.engine,
            retry_after_ms=e.retry_after_ms,
            pool_id=e.pool_id,
            policy_label=e.policy_label,
            param=e.param,
        )

    def _end(
        self,
        t: Task,
        reason: str,
        now: float,
        error: p.ErrorInfo | None = None,
        tokens_in: int = 0,
        tokens_out: int = 0,
        first_token_ms: float = 0.0,
    ) -> None:
        ran = t.state is State.RUNNING
        if ran:
            r = self.replicas.get(t.replica)
            if r is not None:
                r.active.discard(t.spec.task_id)
        elif t.state is State.QUEUED:
            self.queue.remove(t.spec.task_id)
        if t.grant is not None:
            if ran:
                pool = self.pools.pools.get(self.replicas[t.replica].pool_id) if t.replica else None
                self.sessions.settle(
                    t.grant,
                    tokens_in=tokens_in,
                    tokens_out=tokens_out,
                    decode_ms=now - t.started_ms,
                    replica=t.replica,
                    kv_bytes_per_token=pool.kv_bytes_per_token if pool else 0,
                    now=now,
                )
            else:
                self.sessions.release(t.grant, now)
            t.grant = None
        native = (t.model_ref or t.spec.model_ref, pool_of(t, self.replicas))
        code = error.code if error is not None else ""
        self.series.on_ended(native, outcome(reason, code), now - t.enqueued_ms)
        t.state = State.ENDED
        t.tokens_out = tokens_out if ran else 0
        t.end_reason = reason
        t.error = error
        t.ended_ms = now
        self.records.append(End(t.spec.task_id, reason, now + self.wall_offset_ms, error))
        self._ended.append((now, t.spec.task_id))
        self.recent.ended(t, ran, now, tokens_out, first_token_ms)

    def fail_task(self, t: Task, err: p.ErrorInfo, now: float, out: Out) -> None:
        """End a task that its supervisor cannot end (queued, or its supervisor is gone)."""
        self._end(t, "error", now, err)
        self._terminal_by_frontend(t, out)
        self._settle(t, out)

    # ------------------------------------------------------------------ admission

    def submit(self, peer: str, msg: p.Submit, now: float) -> Out:
        spec = msg.task
        out: Out = []
        try:
            prov = (msg.frontend, msg.slot) if msg.frontend >= 0 else None
            pos, predicted = self._admit(spec, now, out, prov)
        except OrchdError as e:
            self.stats.bump(self.stats.rejected, (spec.engine, e.code.value))
            full = e.code is Code.ADMISSION_REJECT
            if full:
                self.stats.bump(self.stats.backpressure, self.queue.policy)
            self.series.on_rejected(spec.engine, e.code.value, self.queue.policy, full)
            pin = (spec.placement or {}).get("mode") == "pin"
            self.series.on_refused(spec.model_ref, e.pool_id or "none", pin)
            return [(peer, p.Failed(msg.req_id, self.error_info(e)))]
        budgets = self.budgets(spec.session_id)
        backoff = 0
        if 2 * len(self.queue) > self.queue.capacity:
            backoff = self.service.slot_interval_ms(self._slots(self.tasks[spec.task_id].pools)[0])
        admitted = p.Admitted(msg.req_id, spec.task_id, pos, predicted, backoff, budgets)
        out.insert(0, (peer, admitted))
        out += self.dispatch(now)
        t = self.tasks[spec.task_id]
        if t.state is State.QUEUED:
            self.series.on_queued_unplaced(pinned(t))
        return out

    def _admit(
        self,
        spec: p.TaskSpec,
        now: float,
        out: Out,
        provisional: tuple[int, int] | None = None,
    ) -> tuple[int, int]:
        if not self.admitting:
            raise OrchdError(
                Code.POOL_UNAVAILABLE, "orchd is shutting down; not admitting", retry_after_ms=5000
            )
        if spec.task_id in self.tasks:
            raise OrchdError(Code.INVALID_PARAMS, f"task_id: {spec.task_id!r} already exists")
        model = self.catalog.check(spec.model_ref)
        pools = self.pools.targets(
            spec.engine, model, spec.workload, spec.placement, spec.sampler_profile_version
        )
        if spec.messages is not None:
            chat = [x for x in pools if x.chat]
            if not chat:
                which = ", ".join(f"pool {x.id}'s {x.engine} engine" for x in pools)
                raise OrchdError(
                    Code.INVALID_PARAMS,
                    f"messages: {which} has no chat template or chat endpoint; "
                    "use /v1/completions with a prompt",
                    param="messages",
                )
            pools = chat
        pool_ids = [x.id for x in pools]
        total, free = self._slots(pool_ids)
        ahead = len(self.queue)
        predicted = self.service.predicted_start_ms(ahead, total, free)
        if self.tpot.samples:
            tokens = spec.expected_tokens or spec.max_tokens
            finish = predicted + self.ttft.mean_ms + max(0, tokens - 1) * self.tpot.mean_ms
            if finish > spec.deadline_ms:
                raise OrchdError(
                    Code.DEADLINE_UNMET,
                    f"deadline_ms: predicted finish in {finish:.0f} ms (start {predicted} ms, "
                    f"{tokens} tokens at {self.tpot.mean_ms:.2f} ms each) is past "
                    f"{spec.deadline_ms} ms",
                )
        grant = self.sessions.admit(spec.session_id, spec.api_key_id, spec.max_tokens, now)
        try:
            pushed = self.queue.push(spec.task_id, spec.priority, None, spec.api_key_id)
        except QueueFull:
            self.sessions.release(grant, now)
            retry = self.service.slot_interval_ms(total)
            raise OrchdError(
                Code.ADMISSION_REJECT,
                f"admission queue is full ({self.queue.capacity} tasks)",
                retry_after_ms=retry,
                policy_label=self.queue.policy,
            ) from None
        if pushed.dropped is not None:
            self._drop(pushed.dropped, now, total, out)
        t = Task(spec, now, pushed.position, predicted, model, pool_ids, grant)
        if provisional is not None:
            t.frontend, t.slot = provisional
            t.stream = step(t.stream, Ev.OPEN)
        self.tasks[spec.task_id] = t
        self.records.append(Admit(spec, now + self.wall_offset_ms))
        self.stats.enqueued += 1
        self.series.on_enqueued(where_of(t, self.replicas, self.pools.pools), spec.priority)
        return pushed.position, predicted

    def _drop(self, task_id: str, now: float, total: int, out: Out) -> None:
        victim = self.tasks[task_id]
        self.stats.bump(self.stats.backpressure, self.queue.policy)
        self.stats.bump(self.stats.rejected, (victim.spec.engine, Code.QUEUE_FULL_DROP_LRU.value))
        drop = Code.QUEUE_FULL_DROP_LRU.value
        self.series.on_rejected(victim.spec.engine, drop, self.queue.policy, True)
        err = OrchdError(
            Code.QUEUE_FULL_DROP_LRU,
            "dropped from the full queue to admit a newer task (policy drop-lru)",
            retry_after_ms=self.service.slot_interval_ms(total),
            policy_label=self.queue.policy,
        )
        self.fail_task(victim, self.error_info(err), now, out)

    def budgets(self, session_id: str) -> p.Budgets:
        s = self.sessions.sessions.get(session_id)
        if s is None:
            return p.Budgets()
        time_ms = None if s.time_left_ms is None else int(s.time_left_ms)
        return p.Budgets(s.tokens_available(), time_ms, s.cost_available())

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> Out:
        """Start every queued task that a replica can take now, in fair order. The queue looks
        past a task that cannot be placed (orchd/core/queue.py), so it blocks nobody; what
        did not fit is remembered per placement shape for this call, so a long queue of tasks
        for a busy pool costs a dict lookup each, not a placement each."""
        out: Out = []
        chosen: dict[str, object] = {}
        if not any(r.usable and r.free_slots > 0 for r in self.replicas.values()):
            return out
        misfits: set[tuple[object, ...]] = set()

        def fits(task_id: str, _: None) -> bool:
            t = self.tasks[task_id]
            pl = t.spec.placement
            shape = (tuple(t.pools), t.model_ref, repr(sorted(pl.items())) if pl else "")
            if shape in misfits:
                return False
            sess = self.sessions.sessions.get(t.spec.session_id)
            warm = sess.last_replica if sess is not None and t.spec.kv_hint != "cold" else ""
            c = self.pools.choose(t.pools, t.model_ref, pl, self.place, warm)
            chosen["c"] = c
            if c is None:
                misfits.add(shape)
            return c is not None

        while not self.parked:
            got = self.queue.pop_first(fits)
            if got is None:
                return out
            t = self.tasks[got[0]]
            c = chosen["c"]
            assert c is not None
            r = c.replica  # type: ignore[attr-defined]
            considered = self._candidates(t.pools)
            r.active.add(t.spec.task_id)
            t.state = State.RUNNING
            t.replica = r.id
            t.placement_reason = c.reason  # type: ignore[attr-defined]
            t.started_ms = now
            self.records.append(Start(t.spec.task_id, r.id, now + self.wall_offset_ms))
            if t.stream in (Stream.SUBSCRIBED, Stream.PROVISIONAL):
                t.stream = step(t.stream, Ev.ATTACH)
            self.stats.started += 1
            self.stats.bump(self.stats.placements, (r.pool_id, r.id))
            self.series.on_started(
                (r.engine, r.engine_version, r.pool_id, r.id),
                t.spec.priority,
                (t.model_ref or t.spec.model_ref, r.pool_id),
                now - t.enqueued_ms,
                pinned(t),
                bool(t.pools) and r.pool_id != t.pools[0],
                considered,
            )
            out.append((sup(r.id), self._dispatch_msg(t, r, now)))
        return out

    def _candidates(self, pool_ids: list[str]) -> int:
        """Replicas a placement of a task for these pools can choose among now."""
        pools = self.pools.pools
        return sum(
            1
            for pid in pool_ids
            if pid in pools and not pools[pid].draining
            for rid in pools[pid].replicas
            if self.replicas[rid].ready and self.replicas[rid].free_slots > 0
        )

    def _dispatch_msg(self, t: Task, r: ReplicaView, now: float) -> p.Dispatch:
        sess = self.sessions.sessions.get(t.spec.session_id)
        kv_warm = bool(sess and sess.last_replica == r.id)
        fed = t.stream in FED
        return p.Dispatch(
            t.spec,
            t.queue_position,
            t.predicted_start_ms,
            t.frontend if fed else -1,
            t.slot if fed else 0,
            model_ref=t.model_ref,
            placement_reason=t.placement_reason,
            queue_depth=len(self.queue),
            deadline_left_ms=int(t.spec.deadline_ms - (now - t.enqueued_ms)),
            tokens_budget=sess.tokens_left if sess else None,
            time_budget_ms=None
            if sess is None or sess.time_left_ms is None
            else int(sess.time_left_ms),
            cost_budget=sess.cost_left if sess else None,
            cost_per_token=self.cost_per_token,
            kv_warm=kv_warm,
            provisional=t.stream is Stream.PROVISIONAL,
        )

    def task_ended(self, peer: str, msg: p.TaskEnded, now: float) -> Out:
        t = self.tasks.get(msg.task_id)
        if t is None or t.state is State.ENDED:
            return []
        # Every task that ran ends here, canceled ones too (their AbortDone follows).
        self.stats.tokens_out += msg.tokens_out
        self.stats.tokens_in += msg.tokens_in
        if msg.first_token_ms:
            self.stats.first_token_ms.append(msg.first_token_ms)
            self.ttft.observe(msg.first_token_ms)
        if msg.decode_ms:
            self.stats.decode_ms.append(msg.decode_ms)
        # A task cut short (canceled, failed, out of budget) says nothing of per-token or
        # service time: its end came from outside the engine.
        natural = msg.reason in ("stop", "length") and not msg.error_code
        if natural and msg.tokens_out > 1 and msg.decode_ms:
            self.tpot.observe((msg.decode_ms - msg.first_token_ms) / (msg.tokens_out - 1))
        if natural:
            self.service.observe(now - t.started_ms)
        # First token from arrival: the queue time here, then dispatch to first token there.
        first = (t.started_ms - t.enqueued_ms) + msg.first_token_ms if msg.tokens_out else None
        self.series.on_ran(
            where_of(t, self.replicas, self.pools.pools),
            t.spec.priority,
            (t.model_ref or t.spec.model_ref, pool_of(t, self.replicas)),
            msg.tokens_in,
            msg.tokens_out,
            first,
            msg.decode_ms,
            msg.gap_counts,
            msg.gap_sum_s,
        )
        error = p.ErrorInfo(msg.error_code, msg.reason) if msg.error_code else None
        self._end(t, msg.reason, now, error, msg.tokens_in, msg.tokens_out, msg.first_token_ms)
        self._ended_in_ring(t)
        out = self.dispatch(now)
        self._settle(t, out)
        return out

    # ------------------------------------------------------------------ shutdown and time

    def drain_all(self, peer: str, msg: p.DrainAll, now: float) -> Out:
        self.admitting = False
        self._drain = (peer, msg.req_id, now + msg.deadline_ms)
        return self.tick(now)

    def running_on(self, pool_id: str) -> list[Task]:
        reps = set(self.pools.pools[pool_id].replicas)
        return [t for t in self.tasks.values() if t.state is State.RUNNING and t.replica in reps]

    def abort_tasks(self, tasks: list[Task], reason: str, now: float) -> Out:
        out: Out = []
        for t in tasks:
            out += self.cancel("", p.Cancel(0, t.spec.task_id, reason), now)
        return out

    def tick(self, now: float) -> Out:
        out: Out = self.expire_queued(now)
        keep = []
        while self._ended and self._ended[0][0] + self.retention_ms <= now:
            _, tid = self._ended.popleft()
            t = self.tasks.get(tid)
            if t is not None and t.state is State.ENDED:
                if t.waiting_cancels:
                    keep.append((now, tid))  # forget it once its cancels are answered
                else:
                    del self.tasks[tid]
        self._ended.extend(keep)
        self.sessions.evict_expired(now)
        out += self.expire_detached(now)
        for pool in self.pools.pools.values():
            if (
                pool.draining
                and pool.drain_deadline_ms is not None
                and now >= pool.drain_deadline_ms
            ):
                out += self.abort_tasks(self.running_on(pool.id), "drained", now)
        if self._drain is not None:
            peer, req_id, deadline = self._drain
            busy = [t for t in self.tasks.values() if t.state is not State.ENDED]
            if busy and now >= deadline:
                # The queued tasks stay in the journal (the next start runs them); nothing
                # more is dispatched; the running ones end with a retriable error.
                self.parked = True
                out += self.abort_tasks(
                    [t for t in busy if t.state is State.RUNNING], "shutdown", now
                )
                busy = [t for t in self.tasks.values() if t.state is State.RUNNING]
            if not busy and not self._fences:
                self._drain = None
                out.append((peer, p.Done(req_id)))
        return out

    def queue_depth(self) -> int:
        return len(self.queue)
