"""Streams and cancels in the scheduler core: who streams a task (a provisional stream at
the admitting frontend, a claim, a take-over by another frontend), and the rule that a cancel
is answered only once the stream's terminal frame is on its wire (``Fence``). A mixin of
:class:`orchd.core.scheduler.SchedulerCore`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ipc import protocol as p
from orchd.core.errors import Code, OrchdError
from orchd.core.sessions import SessionTable
from orchd.core.tasks import Out, State, Stats, Task, fe, sup


class StreamOps:
    # State the core owns (declared here for the type checker).
    tasks: dict[str, Task]
    stats: Stats
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
        if t.frontend < 0 or t.terminal:
            return
        t.terminal = "frontend"
        t.fencing = True
        rid = self.next_id()
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
        if t.frontend >= 0 and not t.provisional:
            err = OrchdError(Code.INVALID_PARAMS, f"task {msg.task_id!r} is already streamed")
            return [(peer, p.Failed(msg.req_id, self.error_info(err)))]
        out: Out = []
        if t.provisional:
            # Opened on another frontend than the one that admitted it: take the stream over.
            out.append((fe(t.frontend), p.Release(t.spec.task_id, t.slot)))
            t.provisional = False
            if t.terminal == "frontend":
                t.terminal = ""  # the released stream had it; write it again here
        t.frontend, t.slot = msg.frontend, msg.slot
        out.append((peer, p.Subscribed(msg.req_id, msg.task_id, self.budgets(t.spec.session_id))))
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
            return [(peer, p.Failed(msg.req_id, self.error_info(err)))]
        out: Out = []
        if peer:  # internal cancels (peer "") want no answer
            t.waiting_cancels.append((peer, msg.req_id))
        if t.state is State.ENDED:
            self._settle(t, out)
            return out
        if t.state is State.QUEUED:
            self.stats.bump(self.stats.canceled, msg.reason)
            self._end(t, "canceled", now)
            self._terminal_by_frontend(t, out)
            self._settle(t, out)
            return out
        if t.spec.task_id not in self._aborts.values():
            self.stats.bump(self.stats.canceled, msg.reason)
            # Running: the supervisor aborts the engine request and publishes the terminal.
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
            self.stats.tokens_out += msg.tokens_out
            self._end(t, "canceled", now, tokens_out=msg.tokens_out)
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

    def claim(self, peer: str, msg: p.Claim, now: float) -> Out:
        """The admitting frontend's client opened the provisional stream."""
        t = self.tasks.get(msg.task_id)
        if t is None or not t.provisional or fe(t.frontend) != peer:
            return []
        t.provisional = False
        if t.replica and (t.state is State.RUNNING or t.transcript_at_supervisor):
            return [(sup(t.replica), p.Claim(msg.task_id))]
        return []

    def unsubscribe(self, peer: str, msg: p.Unsubscribe, now: float) -> Out:
        """The admitting frontend gave up its unclaimed provisional stream."""
        t = self.tasks.get(msg.task_id)
        if t is None or not t.provisional or fe(t.frontend) != peer:
            return []
        return self._detach(t)

    def _detach(self, t: Task) -> Out:
        out: Out = []
        if t.attached and t.replica:
            out.append((sup(t.replica), p.Detach(t.spec.task_id)))
        t.frontend, t.slot = -1, 0
        t.provisional = t.attached = t.fencing = False
        t.terminal = ""
        return out
