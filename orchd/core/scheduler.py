"""The scheduler's state machine: admission, dispatch, subscription, cancel, failure.

Every entry point takes a message (and ``now`` in ms) and returns the messages to send, as
``(peer, message)`` pairs. The shell (``orchd/scheduler/loop.py``) only moves bytes.

Peers are named ``fe<N>`` (frontend N), ``sup-<replica id>`` and ``launcher``.
"""

from __future__ import annotations

import itertools
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from ipc import protocol as p
from orchd.core.errors import Code, OrchdError
from orchd.core.eta import ServiceTime
from orchd.core.placement import ReplicaView, eligible, make_policy
from orchd.core.queue import AdmissionQueue, QueueFull

Out = list[tuple[str, p.Message]]


class State(Enum):
    QUEUED = "queued"
    RUNNING = "running"
    ENDED = "ended"


@dataclass(slots=True)
class Task:
    spec: p.TaskSpec
    enqueued_ms: float
    queue_position: int
    predicted_start_ms: int
    state: State = State.QUEUED
    replica: str = ""
    started_ms: float = 0.0
    ended_ms: float = 0.0
    frontend: int = -1  # who streams it; -1 = nobody yet
    slot: int = 0
    attached: bool = False  # the supervisor knows the subscriber and feeds its ring
    transcript_at_supervisor: bool = False  # a late subscriber can be replayed from there
    terminal: str = ""  # who writes the stream's terminal frame: "ring" | "frontend"
    fencing: bool = False  # waiting for the frontend to put the terminal on the wire
    end_reason: str = ""
    error: p.ErrorInfo | None = None
    # cancels answered only once the stream's terminal frame is on its socket
    waiting_cancels: list[tuple[str, int]] = field(default_factory=list)


@dataclass(slots=True)
class Stats:
    """Counters the shell exports as Prometheus metrics."""

    enqueued: int = 0
    started: int = 0
    rejected: dict[tuple[str, str], int] = field(default_factory=dict)  # (engine, reason)
    canceled: dict[str, int] = field(default_factory=dict)  # reason
    tokens_in: int = 0
    tokens_out: int = 0
    first_token_ms: list[float] = field(default_factory=list)  # drained by the shell
    decode_ms: list[float] = field(default_factory=list)

    def reject(self, engine: str, reason: str) -> None:
        self.rejected[(engine, reason)] = self.rejected.get((engine, reason), 0) + 1

    def cancel(self, reason: str) -> None:
        self.canceled[reason] = self.canceled.get(reason, 0) + 1


def sup(replica_id: str) -> str:
    return f"sup-{replica_id}"


def fe(index: int) -> str:
    return f"fe{index}"


class SchedulerCore:
    def __init__(
        self,
        replicas: list[ReplicaView],
        *,
        queue_capacity: int,
        queue_policy: str = "reject",
        placement: str = "default",
        retention_ms: int = 60_000,
    ) -> None:
        self.replicas = {r.id: r for r in replicas}
        self.queue: AdmissionQueue[None] = AdmissionQueue(queue_capacity, queue_policy)
        self.place = make_policy(placement)
        self.tasks: dict[str, Task] = {}
        self.service = ServiceTime()
        self.stats = Stats()
        self.retention_ms = retention_ms
        self.admitting = True
        self._ids = itertools.count(1)
        self._aborts: dict[int, str] = {}  # abort req id -> task id
        self._fences: dict[int, str] = {}  # fence req id -> task id
        self._ended: deque[tuple[float, str]] = deque()  # (ended_ms, task id), for retention
        self._drain: tuple[str, int, float] | None = None  # (peer, req id, deadline ms)

    # ------------------------------------------------------------------ helpers

    def _total_slots(self) -> tuple[int, int]:
        live = [r for r in self.replicas.values() if r.ready and not r.draining]
        return sum(r.slots for r in live), sum(r.free_slots for r in live)

    def _error(self, e: OrchdError) -> p.ErrorInfo:
        return p.ErrorInfo(
            e.code.value,
            e.message,
            engine=e.engine,
            retry_after_ms=e.retry_after_ms,
            pool_id=e.pool_id,
            policy_label=e.policy_label,
        )

    def _end(self, t: Task, reason: str, now: float, error: p.ErrorInfo | None = None) -> None:
        if t.state is State.RUNNING:
            r = self.replicas.get(t.replica)
            if r is not None:
                r.active.discard(t.spec.task_id)
        elif t.state is State.QUEUED:
            self.queue.remove(t.spec.task_id)
        t.state = State.ENDED
        t.end_reason = reason
        t.error = error
        t.ended_ms = now
        self._ended.append((now, t.spec.task_id))

    def _terminal_by_frontend(self, t: Task, out: Out) -> None:
        """The producer cannot write this stream's terminal frame: its frontend writes it."""
        if t.frontend < 0 or t.terminal:
            return
        t.terminal = "frontend"
        t.fencing = True
        rid = next(self._ids)
        self._fences[rid] = t.spec.task_id
        if t.error is not None:
            out.append((fe(t.frontend), p.StreamFail(rid, t.slot, t.spec.task_id, t.error)))
        else:
            out.append((fe(t.frontend), p.StreamEnd(rid, t.slot, t.spec.task_id, t.end_reason)))

    def _settle(self, t: Task, out: Out) -> None:
        """Answer waiting cancels of an ended task once its terminal frame is on the wire."""
        if not t.waiting_cancels or t.fencing:
            return
        if t.frontend >= 0 and t.terminal == "ring":
            # The frame is in (or on its way to) the ring: the frontend flushes it, then says so.
            t.fencing = True
            rid = next(self._ids)
            self._fences[rid] = t.spec.task_id
            out.append((fe(t.frontend), p.Fence(rid, t.slot)))
            return
        for peer, req_id in t.waiting_cancels:
            out.append((peer, p.Done(req_id)))
        t.waiting_cancels.clear()

    # ------------------------------------------------------------------ admission

    def submit(self, peer: str, msg: p.Submit, now: float) -> Out:
        spec = msg.task
        try:
            pos, predicted = self._admit(spec, now)
        except OrchdError as e:
            self.stats.reject(spec.engine, e.code.value)
            return [(peer, p.Failed(msg.req_id, self._error(e)))]
        out: Out = [(peer, p.Admitted(msg.req_id, spec.task_id, pos, predicted))]
        out += self.dispatch(now)
        return out

    def _admit(self, spec: p.TaskSpec, now: float) -> tuple[int, int]:
        if not self.admitting:
            raise OrchdError(Code.POOL_UNAVAILABLE, "orchd is shutting down; not admitting")
        if spec.task_id in self.tasks:
            raise OrchdError(Code.INVALID_PARAMS, f"task_id {spec.task_id!r} already exists")
        serving = [r for r in self.replicas.values() if r.engine == spec.engine]
        if not serving:
            engines = sorted({r.engine for r in self.replicas.values()})
            raise OrchdError(
                Code.INVALID_PARAMS,
                f"engine: no pool serves engine {spec.engine!r} (served: {', '.join(engines)})",
            )
        total, free = self._total_slots()
        try:
            pushed = self.queue.push(spec.task_id, spec.priority, None)
        except QueueFull:
            retry = self.service.slot_interval_ms(total)
            raise OrchdError(
                Code.ADMISSION_REJECT,
                f"admission queue is full ({self.queue.capacity} tasks)",
                retry_after_ms=retry,
                policy_label=self.queue.policy,
            ) from None
        predicted = self.service.predicted_start_ms(pushed.position - 1, total, free)
        self.tasks[spec.task_id] = Task(spec, now, pushed.position, predicted)
        self.stats.enqueued += 1
        return pushed.position, predicted

    # ------------------------------------------------------------------ dispatch

    def dispatch(self, now: float) -> Out:
        out: Out = []
        while True:
            head = self.queue.peek()
            if head is None:
                return out
            t = self.tasks[head[0]]
            cands = eligible(list(self.replicas.values()), t.spec.engine)
            if not cands:
                return out  # FIFO: the head waits for a slot, and so does everyone behind it
            self.queue.pop()
            r = self.place(cands)
            r.active.add(t.spec.task_id)
            t.state = State.RUNNING
            t.replica = r.id
            t.started_ms = now
            self.stats.started += 1
            t.attached = t.frontend >= 0
            out.append(
                (
                    sup(r.id),
                    p.Dispatch(t.spec, t.queue_position, t.predicted_start_ms, t.frontend, t.slot),
                )
            )

    # ------------------------------------------------------------------ streams

    def subscribe(self, peer: str, msg: p.Subscribe, now: float) -> Out:
        t = self.tasks.get(msg.task_id)
        if t is None:
            err = OrchdError(Code.NOT_FOUND, f"no task {msg.task_id!r}")
            return [(peer, p.Failed(msg.req_id, self._error(err)))]
        if t.frontend >= 0:
            err = OrchdError(Code.INVALID_PARAMS, f"task {msg.task_id!r} is already streamed")
            return [(peer, p.Failed(msg.req_id, self._error(err)))]
        t.frontend, t.slot = msg.frontend, msg.slot
        out: Out = [(peer, p.Subscribed(msg.req_id, msg.task_id))]
        if t.state is State.RUNNING or t.transcript_at_supervisor:
            # The supervisor replays the transcript so far, then streams live.
            t.attached = True
            if t.state is State.ENDED:
                t.terminal = "ring"
            out.append((sup(t.replica), p.Attach(t.spec.task_id, msg.frontend, msg.slot)))
        elif t.state is State.ENDED:
            self._terminal_by_frontend(t, out)
        return out

    def cancel(self, peer: str, msg: p.Cancel, now: float) -> Out:
        t = self.tasks.get(msg.task_id)
        if t is None:
            err = OrchdError(Code.NOT_FOUND, f"no task {msg.task_id!r}")
            return [(peer, p.Failed(msg.req_id, self._error(err)))]
        out: Out = []
        if peer:  # internal cancels (peer "") want no answer
            t.waiting_cancels.append((peer, msg.req_id))
        if t.state is State.ENDED:
            self._settle(t, out)
            return out
        if t.state is State.QUEUED:
            self.stats.cancel(msg.reason)
            self._end(t, "canceled", now)
            self._terminal_by_frontend(t, out)
            self._settle(t, out)
            return out
        if t.spec.task_id not in self._aborts.values():
            self.stats.cancel(msg.reason)
            # Running: the supervisor aborts the engine request and publishes the terminal.
            rid = next(self._ids)
            self._aborts[rid] = t.spec.task_id
            out.append((sup(t.replica), p.Abort(rid, t.spec.task_id, msg.reason)))
        return out

    def abort_done(self, peer: str, msg: p.AbortDone, now: float) -> Out:
        tid = self._aborts.pop(msg.req_id, None)
        t = self.tasks.get(tid or msg.task_id)
        if t is None:
            return []
        out: Out = []
        if t.state is not State.ENDED:
            self.stats.tokens_out += msg.tokens_out
            self._end(t, "canceled", now)
            t.transcript_at_supervisor = True
            if t.attached:
                t.terminal = "ring"
            out += self.dispatch(now)
        self._settle(t, out)
        return out

    def fence_done(self, peer: str, msg: p.FenceDone, now: float) -> Out:
        tid = self._fences.pop(msg.req_id, None)
        t = self.tasks.get(tid) if tid else None
        out: Out = []
        if t is not None:
            t.fencing = False
            for cpeer, req_id in t.waiting_cancels:
                out.append((cpeer, p.Done(req_id)))
            t.waiting_cancels.clear()
        return out

    def task_ended(self, peer: str, msg: p.TaskEnded, now: float) -> Out:
        t = self.tasks.get(msg.task_id)
        if t is None or t.state is State.ENDED:
            return []
        self.stats.tokens_out += msg.tokens_out
        self.stats.tokens_in += msg.tokens_in
        if msg.first_token_ms:
            self.stats.first_token_ms.append(msg.first_token_ms)
        if msg.decode_ms:
            self.stats.decode_ms.append(msg.decode_ms)
        self.service.observe(now - t.started_ms)
        error = p.ErrorInfo(msg.error_code, msg.reason) if msg.error_code else None
        self._end(t, msg.reason, now, error)
        t.transcript_at_supervisor = True
        if t.attached:
            t.terminal = "ring"
        out = self.dispatch(now)
        self._settle(t, out)
        return out

    # ------------------------------------------------------------------ replicas and peers

    def replica_status(self, peer: str, msg: p.ReplicaStatus, now: float) -> Out:
        r = self.replicas.get(msg.replica_id)
        if r is None:
            return []
        r.ready = msg.ready
        r.engine_version = msg.engine_version
        if msg.last_error:
            r.last_error = msg.last_error
        return self.dispatch(now) if r.ready else []

    def peer_down(self, ident: str, reason: str, now: float) -> Out:
        out: Out = []
        if ident.startswith("sup-"):
            r = self.replicas.get(ident[4:])
            if r is None:
                return out
            r.ready = False
            r.last_error = reason
            err = p.ErrorInfo(
                Code.WORKER_RESET.value,
                f"engine supervisor for replica {r.id} died: {reason}",
                engine=r.engine,
                pool_id=r.pool_id,
            )
            for rid, tid in list(self._aborts.items()):
                if tid in r.active:
                    del self._aborts[rid]
            for t in self.tasks.values():
                if t.replica != r.id:
                    continue
                if t.state is State.RUNNING:
                    self._end(t, "error", now, err)
                    self._terminal_by_frontend(t, out)
                    self._settle(t, out)
                if t.transcript_at_supervisor and not t.attached:
                    t.transcript_at_supervisor = False  # lost with the process
                    t.error = err
        elif ident.startswith("fe"):
            index = int(ident[2:])
            for rid, tid in list(self._fences.items()):
                fenced = self.tasks.get(tid)
                if fenced is not None and fenced.frontend == index:
                    del self._fences[rid]
                    fenced.fencing = False
                    fenced.frontend = -1
                    self._settle(fenced, out)
            # Its clients are gone with it: cancel what they were streaming.
            for t in list(self.tasks.values()):
                if t.frontend == index and t.state is not State.ENDED:
                    out += self.cancel("", p.Cancel(0, t.spec.task_id, "frontend_lost"), now)
        return out

    # ------------------------------------------------------------------ shutdown and time

    def drain_all(self, peer: str, msg: p.DrainAll, now: float) -> Out:
        self.admitting = False
        self._drain = (peer, msg.req_id, now + msg.deadline_ms)
        return self.tick(now)

    def tick(self, now: float) -> Out:
        out: Out = []
        while self._ended and self._ended[0][0] + self.retention_ms <= now:
            _, tid = self._ended.popleft()
            t = self.tasks.get(tid)
            if t is not None and t.state is State.ENDED and not t.waiting_cancels:
                del self.tasks[tid]
        if self._drain is not None:
            peer, req_id, deadline = self._drain
            busy = [t for t in self.tasks.values() if t.state is not State.ENDED]
            if busy and now >= deadline:
                err = p.ErrorInfo(
                    Code.POOL_UNAVAILABLE.value, "orchd shut down before the task ran"
                )
                for t in busy:
                    if t.state is State.QUEUED:
                        self._end(t, "error", now, err)
                        self._terminal_by_frontend(t, out)
                    else:
                        out += self.cancel("", p.Cancel(0, t.spec.task_id, "shutdown"), now)
                busy = [t for t in self.tasks.values() if t.state is not State.ENDED]
            if not busy and not self._fences:
                self._drain = None
                out.append((peer, p.Done(req_id)))
        return out

    def queue_depth(self) -> int:
        return len(self.queue)
