"""Streams and cancels in the scheduler core: who streams a task (a provisional stream at
the admitting frontend, a claim, a take-over by another frontend), and the rule that a cancel
is answered only once the stream's terminal frame is on its wire (``Fence``), and resumable
streams: a client that leaves mid-stream (or whose frontend dies) detaches the stream, the
task runs on for ``resume_grace_ms`` and a GET with ``Last-Event-ID`` on any frontend takes it
back; past the grace the task is canceled. The states and the cancel handshake are
:mod:`orchd.core.ownership`; every change of ``Task.stream`` here is one of its transitions.
A mixin of :class:`orchd.core.scheduler.SchedulerCore`."""

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
    # Detached streams: task id -> (the time its grace ends, ms; why it was detached).
    _detached: dict[str, tuple[float, str]]
    resume_grace_ms: float

    if TYPE_CHECKING:

        def next_id(self) -> int: ...
        def error_info(self, e: OrchdError) -> p.ErrorInfo: ...
        def budgets(self, session_id: str) -> p.Budgets: ...
        def dispatch(self, now: float) -> Out: ...
        def fail_task(self, t: Task, err: p.ErrorInfo, now: float, out: Out) -> None: ...
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
        if t.spec.api != "native" and not (t.spec.stream and t.spec.api != "embeddings"):
            err = OrchdError(Code.INVALID_PARAMS, f"task {msg.task_id!r} is not a stream")
            return [(peer, p.Failed(msg.req_id, self.error_info(err)))]
        # An ended task's stream has no live events left to interleave: a GET without
        # Last-Event-ID replays it whole (as from before the first event), even while an
        # earlier connection still writes its last frames. Only a live stream is contested.
        resume = msg.after_seq >= 0 or t.state is State.ENDED
        if t.stream not in OPENABLE and not resume:
            err = OrchdError(
                Code.STREAM_CONFLICT,
                f"task {msg.task_id!r} is already streamed on another connection; "
                "send Last-Event-ID to take the stream over",
            )
            return [(peer, p.Failed(msg.req_id, self.error_info(err)))]
        out: Out = []
        if t.stream is not Stream.NONE and t.frontend >= 0:
            # Held by another stream (unclaimed where it was admitted, or a client's
            # connection a resume takes over): that stream ends.
            out.append((fe(t.frontend), p.Release(t.spec.task_id, t.slot)))
            for rid in [r for r, tid in self._fences.items() if tid == t.spec.task_id]:
                del self._fences[rid]  # (its old wire's fence answers nothing now)
        self._detached.pop(t.spec.task_id, None)
        t.stream = step(t.stream, Ev.RESUME if resume else Ev.SUBSCRIBE)
        t.frontend, t.slot = msg.frontend, msg.slot
        codec = "native" if t.spec.api == "native" else "openai"
        budgets = self.budgets(t.spec.session_id)
        out.append((peer, p.Subscribed(msg.req_id, msg.task_id, budgets, codec)))
        if t.state is State.RUNNING or t.replayable:
            # The supervisor replays the transcript so far (after the client's last event),
            # then streams live.
            t.stream = step(t.stream, Ev.ATTACH)
            if t.state is State.ENDED:
                t.stream = step(t.stream, Ev.TERMINAL)
            attach = p.Attach(t.spec.task_id, msg.frontend, msg.slot, msg.after_seq)
            out.append((sup(t.replica), attach))
        elif t.state is State.ENDED:
            self._terminal_by_frontend(t, out)
        if t.state is State.ENDED:
            self._settle(t, out)  # cancels waiting on a stream taken over: fenced anew
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
        """The admitting frontend gave up its unclaimed provisional stream, or a client left
        its stream before the terminal (detached: canceled unless resumed within the grace)."""
        t = self.tasks.get(msg.task_id)
        if t is None or fe(t.frontend) != peer:
            return []
        if msg.slot == 0 and self._unclaimed_at(t, peer):
            return self._detach(t)
        if msg.slot == t.slot and t.stream in (Stream.SUBSCRIBED, Stream.ATTACHED):
            return self._let_go(t, Ev.DROP, "client_disconnect", now)
        return []  # an ended stream (its transcript stays), or one taken over meanwhile

    def _let_go(self, t: Task, ev: Ev, why: str, now: float) -> Out:
        """Nobody reads the stream now: stop feeding it and start its grace period."""
        out: Out = []
        if t.replica and t.state is State.RUNNING:
            out.append((sup(t.replica), p.Detach(t.spec.task_id)))
        t.stream = step(t.stream, ev)
        t.frontend, t.slot = -1, 0
        self._detached[t.spec.task_id] = (now + self.resume_grace_ms, why)
        return out

    def expire_detached(self, now: float) -> Out:
        """Detached streams whose grace passed with no GET: their tasks end. A client that
        left is taken at its word (canceled); a stream orchd lost ends with a retriable
        STREAM_INTERRUPTED, never ``canceled``."""
        out: Out = []
        for tid, (until, why) in list(self._detached.items()):
            if now < until:
                continue
            del self._detached[tid]
            t = self.tasks.get(tid)
            if t is None or t.stream is not Stream.DETACHED:
                continue
            t.stream = step(t.stream, Ev.EXPIRE)
            if t.state is State.ENDED:
                continue
            if why == "frontend_lost" and t.state is State.QUEUED:
                self.fail_task(t, self.error_info(_interrupted()), now, out)
                continue
            out += self.cancel("", p.Cancel(0, tid, why), now)
        return out

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
        """A frontend died (or was declared dead): its clients may resume elsewhere."""
        out: Out = []
        for rid, tid in list(self._fences.items()):
            fenced = self.tasks.get(tid)
            if fenced is not None and fenced.frontend == index:
                del self._fences[rid]
        notice = self.error_info(_interrupted())
        for t in list(self.tasks.values()):
            if t.frontend != index or t.stream is Stream.NONE:
                continue
            if t.stream in (Stream.PROVISIONAL, Stream.PROVISIONAL_ENDED):
                out += self._detach(t)  # nobody was streaming it yet: it runs on
                continue
            if t.stream in (Stream.SUBSCRIBED, Stream.ATTACHED):
                # A frontend that was only paused learns it here (ZMQ keeps the notice for
                # it) and ends the stream with a retriable error its client resumes from.
                tid = t.spec.task_id
                out.append((fe(index), p.StreamFail(0, t.slot, tid, notice)))
                out += self._let_go(t, Ev.LOST, "frontend_lost", now)
                continue
            t.stream = step(t.stream, Ev.LOST)
            t.frontend, t.slot = -1, 0
            self._settle(t, out)
        return out


def _interrupted() -> OrchdError:
    return OrchdError(
        Code.STREAM_INTERRUPTED,
        "the frontend serving this stream failed; the task runs on for "
        "limits.resume_grace_ms: reconnect with Last-Event-ID to resume",
        retry_after_ms=0,
    )
