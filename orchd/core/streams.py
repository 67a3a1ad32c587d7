"""Streams and cancels in the scheduler core: who streams a task (a provisional stream at
the admitting frontend, a claim, a take-over by another frontend), and the rule that a cancel
is answered only once the stream's terminal frame is on its wire (``Fence``). The states and
the cancel handshake are :mod:`orchd.core.ownership`; every change of ``Task.stream`` here is
one of its transitions. A mixin of :class:`orchd.core.scheduler.SchedulerCore`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipc import protocol as p
from orchd.core.errors import Code, OrchdError
from orchd.core.ownership import FED, OPENABLE, Ev, Stream, step
from orchd.core.placement import ReplicaView
from orchd.core.pools import Pools
from orchd.core.series import Series, where_of
from orchd.core.sessions import SessionTable
from orchd.core.tasks import Out, State, Stats, Task, fe, sup


class StreamOps:
    # State the core owns (declared here for the type checker).
    tasks: dict[str, Task]
    stats: Stats
    series: Series
    replicas: dict[str, ReplicaView]
    pools: Pools
    sessions: SessionTable
    _aborts: dict[int, str]
    _fences: dict[int, str]

    if TYPE_CHECKING:

        def next_id(self) -> int: ...
        def error_info(self, e: OrchdError) -> p.ErrorInfo: ...
        def budgets(self, session_id: str) -> p.Budgets: ...
        def dispatch(self, now: float) -> Out: ...
        def _end(
            self,
            t: Task,
            reason: str,
            now: float,
            error: p.ErrorInfo | None = None,
            tokens_in: int = 0,
            tokens_out: int = 0,
        ) -> None: ...

    def _terminal_by_frontend(self, t: Task, out: Out) -> None:
        """The producer cannot write this stream's terminal frame: its frontend writes it."""
        if t.stream not in FED and t.stream is not Stream.SUBSCRIBED:
            return  # nobody streams it, or its terminal is already written
        unclaimed = t.stream is Stream.PROVISIONAL
        t.stream = step(t.stream, Ev.TERMINAL)
        rid = 0  # an unclaimed stream has no wire to fence
        if not unclaimed:
            rid = self.next_id()
            self._fences[rid] = t.spec.task_id
            t.stream = step(t.stream, Ev.FENCE)
        tid = t.spec.task_id
        if t.error is not None:
            out.append((fe(t.frontend), p.StreamFail(rid, t.slot, tid, t.error)))
        else:
            out.append((fe(t.frontend), p.StreamEnd(rid, t.slot, tid, t.end_reason)))

    def _ended_in_ring(self, t: Task) -> None:
        """The supervisor ended the task: its terminal is in the ring of whoever it fed."""
        t.replayable = True
        if t.stream in FED:
            t.stream = step(t.stream, Ev.TERMINAL)

    def _settle(self, t: Task, out: Out) -> None:
        """Answer waiting cancels of an ended task once its terminal frame is on the wire."""
        if not t.waiting_cancels or t.stream is Stream.FENCING:
            return
        if t.stream is Stream.TERMINAL_PENDING:
            # The frame is in (or on its way to) the ring: the frontend flushes it, then says so.
            t.stream = step(t.stream, Ev.FENCE)
            rid = self.next_id()
            self._fences[rid] = t.spec.task_id
            out.append((fe(t.frontend), p.Fence(rid, t.slot)))
            return
        for peer, req_id in t.waiting_cancels:
            out.append((peer, p.Done(req_id)))
        t.waiting_cancels.clear()

    # ------------------------------------------------------------------ streams

    def subscribe(self, peer: str, msg: p.Subscribe, now: float) -> Out:
        t = self.tasks.get(msg.task_id)
        if t is None:
            err = OrchdError(Code.NOT_FOUND, f"no task {msg.task_id!r}")
            return [(peer, p.Failed(msg.req_id, self.error_info(err)))]
        if t.stream not in OPENABLE:
            err = OrchdError(Code.INVALID_PARAMS, f"task {msg.task_id!r} is already streamed")
            return [(peer, p.Failed(msg.req_id, self.error_info(err)))]
        out: Out = []
        if t.stream is not Stream.NONE:
            # Opened on another frontend than the one that admitted it: take the stream over.
            out.append((fe(t.frontend), p.Release(t.spec.task_id, t.slot)))
        t.stream = step(t.stream, Ev.SUBSCRIBE)
        t.frontend, t.slot = msg.frontend, msg.slot
        out.append((peer, p.Subscribed(msg.req_id, msg.task_id, self.budgets(t.spec.session_id))))
        if t.state is State.RUNNING or t.replayable:
            # The supervisor replays the transcript so far, then streams live.
            t.stream = step(t.stream, Ev.ATTACH)
            if t.state is State.ENDED:
                t.stream = step(t.stream, Ev.TERMINAL)
            out.append((sup(t.replica), p.Attach(t.spec.task_id, msg.frontend, msg.slot)))
        elif t.state is State.ENDED:
            self._terminal_by_frontend(t, out)
        return out

    def cancel(self, peer: str, msg: p.Cancel, now: float) -> Out:
        t = self.tasks.get(msg.task_id)
        if t is None:
            err = OrchdError(Code.NOT_FOUND, f"no task {msg.task_id!r}")
            return [(peer, p.Failed(msg.req_id, self.error_info(err)))]
        out: Out = []
        if peer:  # internal cancels (peer "") want no answer
            t.waiting_cancels.append((peer, msg.req_id))
        if t.state is State.ENDED:
            self._settle(t, out)
            return out
        if t.state is State.QUEUED:
            self.stats.bump(self.stats.canceled, msg.reason)
            self.series.on_canceled(where_of(t, self.replicas, self.pools.pools), msg.reason)
            self._end(t, "canceled", now)
            self._terminal_by_frontend(t, out)
            self._settle(t, out)
            return out
        if t.spec.task_id not in self._aborts.values():
            self.stats.bump(self.stats.canceled, msg.reason)
            self.series.on_canceled(where_of(t, self.replicas, self.pools.pools), msg.reason)
            # Running: the supervisor aborts the engine request, publishes the terminal, and
            # says TaskEnded (reason canceled) before its AbortDone.
            rid = self.next_id()
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
            # The supervisor had no such task (its TaskEnded would have come first): nothing
            # reached the ring, so the frontend writes the end.
            self._end(t, "canceled", now)
            self._terminal_by_frontend(t, out)
            out += self.dispatch(now)
        self._settle(t, out)
        return out

    def fence_done(self, peer: str, msg: p.FenceDone, now: float) -> Out:
        tid = self._fences.pop(msg.req_id, None)
        t = self.tasks.get(tid) if tid else None
        out: Out = []
        if t is not None and t.stream is Stream.FENCING:
            t.stream = step(t.stream, Ev.SENT)
            for cpeer, req_id in t.waiting_cancels:
                out.append((cpeer, p.Done(req_id)))
            t.waiting_cancels.clear()
        return out

    def claim(self, peer: str, msg: p.Claim, now: float) -> Out:
        """The admitting frontend's client opened the provisional stream."""
        t = self.tasks.get(msg.task_id)
        if t is None or not self._unclaimed_at(t, peer):
            return []
        t.stream = step(t.stream, Ev.CLAIM)
        if t.stream is Stream.SUBSCRIBED and t.state is State.RUNNING:
            t.stream = step(t.stream, Ev.ATTACH)  # (it was fed all along)
        if t.replica and (t.state is State.RUNNING or t.replayable):
            return [(sup(t.replica), p.Claim(msg.task_id))]
        return []

    def unsubscribe(self, peer: str, msg: p.Unsubscribe, now: float) -> Out:
        """The admitting frontend gave up its unclaimed provisional stream."""
        t = self.tasks.get(msg.task_id)
        if t is None or not self._unclaimed_at(t, peer):
            return []
        return self._detach(t)

    @staticmethod
    def _unclaimed_at(t: Task, peer: str) -> bool:
        unclaimed = t.stream in (Stream.PROVISIONAL, Stream.PROVISIONAL_ENDED)
        return unclaimed and fe(t.frontend) == peer

    def _detach(self, t: Task) -> Out:
        out: Out = []
        if t.replica:
            out.append((sup(t.replica), p.Detach(t.spec.task_id)))
        t.stream = step(t.stream, Ev.DETACH)
        t.frontend, t.slot = -1, 0
        return out

    def frontend_lost(self, index: int, now: float) -> Out:
        """A frontend died: its clients are gone with it."""
        out: Out = []
        for rid, tid in list(self._fences.items()):
            fenced = self.tasks.get(tid)
            if fenced is not None and fenced.frontend == index:
                del self._fences[rid]
        for t in list(self.tasks.values()):
            if t.frontend != index or t.stream is Stream.NONE:
                continue
            if t.stream in (Stream.PROVISIONAL, Stream.PROVISIONAL_ENDED):
                out += self._detach(t)  # nobody was streaming it yet: it runs on
                continue
            t.stream = step(t.stream, Ev.LOST)
            t.frontend, t.slot = -1, 0
            if t.state is State.ENDED:
                self._settle(t, out)
            else:
                # Cancel what its clients were streaming (and write to it no more: nobody
                # would answer).
                out += self.cancel("", p.Cancel(0, t.spec.task_id, "frontend_lost"), now)
        return out
