"""The engine supervisor's rules, sans-IO: what happens to each task between its dispatch and
its terminal frame, and to the engines that serve them.

Inputs come with ``now`` (seconds, any monotonic clock): the scheduler's messages
(:meth:`SupervisorCore.on_message`), the engine's reports (:meth:`tokens`, :meth:`usage`,
:meth:`finish`, :meth:`error`, and its lifecycle: :meth:`engine_ready`,
:meth:`engine_start_failed`, :meth:`engine_dead`, :meth:`prepared`), the rings' room
(:meth:`rings_backed_up`) and time (:meth:`tick`). Outputs are effects the shell carries out
(:meth:`take`), ring records (:meth:`flush`) and the next deadline (:meth:`next_deadline`).
The shell (``engine_procs/supervisor.py``) owns the sockets, the rings and the engines.

Rules kept here: each event is encoded once into the transcript, and into the outbox while
a frontend is fed (``orchd/core/ownership.py``); coalescing (the first token at once, then
every N tokens or ``stream_interval_ms``); one deadline heap for decode timeouts, time
budgets, `metrics` frames and coalescing releases; every transcript kept for
``transcript_retention_ms`` after its end, delivered or not, so a client resumes from any
event (``Last-Event-ID``) on any frontend; budgets end a task with ``end {reason: budget}``;
every task that ran ends with one ``TaskEnded`` (a canceled one before the ``AbortDone`` that answers the cancel). The
replica's engines (restarts, reloads) are :mod:`engine_procs.supervisor_engines`.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from engine_procs.codecs import OpenAICodec
from engine_procs.deadlines import DeadlineHeap
from engine_procs.held import running
from engine_procs.runs import NO_ENGINE, Run, abort_error, recent_itl_ms, started_event
from engine_procs.supervisor_effects import (
    Effect,
    Log,
    PauseReading,
    Record,
    Send,
    Stop,
    Submit,
)
from engine_procs.supervisor_engines import EngineSet
from ipc import protocol as p
from ipc.frames import (
    KIND_DATA,
    KIND_TERMINAL,
    end_data,
    end_frame,
    error_frame,
    frame,
    frames_after,
    token_frame,
)
from orchd.config import Config, Replica
from orchd.core.errors import Code, OrchdError
from orchd.core.ownership import FED, Ev, Stream, step

RETENTION_SLACK_S = 5.0  # transcripts outlive the scheduler's retention by this much
ITL_SAMPLE = 64  # runs sampled for the recent inter-token time


class SupervisorCore:
    def __init__(
        self, cfg: Config, replica: Replica, *, now: float, random_seed: Callable[[], int]
    ) -> None:
        self.cfg = cfg
        self.random_seed = random_seed
        sch = cfg.scheduling
        self.decode_timeout_s = replica.decode_timeout_ms / 1000.0
        self.metrics_s = sch.metrics_interval_ms / 1000.0
        self.coalesce = max(1, sch.stream_interval_tokens)
        self.coalesce_s = sch.stream_interval_ms / 1000.0
        self.retention_s = cfg.limits.transcript_retention_ms / 1000.0 + RETENTION_SLACK_S
        self.heartbeat_s = cfg.server.heartbeat_ms / 1000.0
        self.runs: dict[str, Run] = {}
        self.by_rid: dict[int, Run] = {}
        self.ended: dict[str, Run] = {}  # transcripts kept for late subscribers
        self.ended_order: deque[Run] = deque()
        self.dirty: list[Run] = []
        self.direct: list[Record] = []  # records for no run (a replay of a lost transcript)
        self.checks = DeadlineHeap()  # each run's next check
        self.next_heartbeat = now + self.heartbeat_s
        self.rids = itertools.count(1)
        self.paused = False
        self.queue_depth = 0
        self.out: list[Effect] = []
        self.engines = EngineSet(cfg, replica, self.out)

    # ---------------------------------------------------------------- plumbing

    def take(self) -> list[Effect]:
        """The effects produced since the last call, in order."""
        out = self.out[:]
        self.out.clear()  # (the engine set appends to the same list)
        return out

    @property
    def replica(self) -> Replica:
        """The replica as it serves now (a reload changes its model)."""
        return self.engines.replica

    def _send(self, msg: p.Message) -> None:
        self.out.append(Send(msg))

    def _log(self, level: str, event: str, **fields: Any) -> None:
        self.out.append(Log(level, event, fields))

    # ---------------------------------------------------------------- scheduler messages

    def on_message(self, msg: p.Message, now: float) -> None:
        match msg:
            case p.Dispatch():
                self.dispatch(msg, now)
            case p.Attach():
                self.attach(msg, now)
            case p.Abort():
                self.abort(msg, now)
            case p.QueueDepth():
                self.queue_depth = msg.depth
            case p.Rehello():
                # The scheduler does not know us (it took us as dead, or it is new): the shell
                # has said hello again; re-announce the tasks we hold and the replica.
                self._log("warning", "scheduler asked us to introduce ourselves again")
                self.announce()
                self.engines.status()
            case p.Claim():
                self.claim(msg.task_id)
            case p.Detach():
                self.detach(msg.task_id)
            case p.ReloadPrepare():
                self.engines.prepare(msg.req_id, msg.model_ref)
            case p.ReloadCommit():
                self.engines.commit(msg.req_id)
            case p.ReloadAbort():
                self.engines.abort_reload(msg.req_id)
            case p.Welcome(accepted=False):
                self._log("error", "scheduler refused us", reason=msg.reason)
                self.out.append(Stop(f"scheduler refused us: {msg.reason}"))

    def dispatch(self, msg: p.Dispatch, now: float) -> None:
        spec = msg.task
        run = Run.dispatched(msg, next(self.rids), now, self.engines.acquire())
        self.queue_depth = msg.queue_depth
        self.runs[run.task_id] = run
        self.by_rid[run.rid] = run
        if self.engines.ready:
            # The engine first: its first token is the latency clients feel.
            seed = spec.seed if spec.seed is not None else self.random_seed()
            self.out.append(Submit(run.engine, run.engine_request(seed)))
        if spec.api != "native":
            run.codec = OpenAICodec(spec)
            first = run.codec.started(run)
            if first:
                self._emit(run, first)
            else:
                self._mark(run)  # (nothing to send yet)
        else:
            version = self.engines.version()
            self._emit(run, frame("started", 0, started_event(msg, self.replica, version)))
        self._schedule(run, now)
        if not self.engines.ready:
            err = self.engines.worker_reset(f"is restarting: {self.engines.last_error}")
            self._fail(run, err, now, engine_done=True)  # (never submitted)

    def _find(self, task_id: str) -> Run | None:
        return self.runs.get(task_id) or self.ended.get(task_id)

    def attach(self, msg: p.Attach, now: float) -> None:
        """A client opened the stream (on any frontend), maybe resuming after event
        ``after_seq``: replay the transcript from there, then live. It takes the stream from
        whoever held it."""
        run = self._find(msg.task_id)
        if run is None:
            err = OrchdError(
                Code.INTERNAL,
                f"the transcript of task {msg.task_id} is gone (kept for "
                f"limits.transcript_retention_ms after its end, and lost with its supervisor)",
            )
            seq = max(1, msg.after_seq + 1)
            self.direct.append(
                (msg.frontend, msg.slot, seq, KIND_TERMINAL, error_frame(seq, err.envelope()))
            )
            return
        run.stream = step(step(run.stream, Ev.RESUME), Ev.ATTACH)
        run.frontend, run.slot = msg.frontend, msg.slot
        replay = frames_after(run.transcript, msg.after_seq)
        if not replay and run.ended:
            replay = run.transcript[-1]  # the client had it all: its terminal again, alone
        run.outbox = [replay]
        self._mark(run)
        if run.ended:
            run.stream = step(run.stream, Ev.TERMINAL)
        else:
            self._schedule(run, now)  # now it may owe `metrics` frames

    def claim(self, task_id: str) -> None:
        """The provisional stream is a client's now."""
        run = self._find(task_id)
        if run is None or run.stream not in (Stream.PROVISIONAL, Stream.PROVISIONAL_ENDED):
            return
        run.stream = step(run.stream, Ev.CLAIM)
        if run.stream is Stream.SUBSCRIBED:
            run.stream = step(run.stream, Ev.ATTACH)

    def detach(self, task_id: str) -> None:
        """Stop feeding the stream: it was unclaimed and let go, or its client (or its
        frontend) is gone and may resume. The transcript stays for a replay."""
        run = self._find(task_id)
        if run is None:
            return
        if run.stream in (Stream.PROVISIONAL, Stream.PROVISIONAL_ENDED):
            run.stream = step(run.stream, Ev.DETACH)
        elif run.stream in (Stream.SUBSCRIBED, Stream.ATTACHED):
            run.stream = step(run.stream, Ev.DROP)
        else:
            return
        run.frontend, run.slot = -1, 0
        run.outbox = []

    def abort(self, msg: p.Abort, now: float) -> None:
        run = self.runs.get(msg.task_id)
        if run is not None:
            err = abort_error(msg.reason, self.replica)
            if err is not None:
                self._fail(run, err, now)
            else:
                self._end(run, "canceled", now)
        self.out.append(Send(p.AbortDone(msg.req_id, msg.task_id), after_rings=True))

    # ---------------------------------------------------------------- the engine's reports

    def tokens(self, rid: int, texts_json: list[bytes], now: float) -> None:
        run = self.by_rid.get(rid)
        if run is None:
            return  # aborted: late tokens are dropped here, never reach a stream
        if run.tokens == 0:
            run.t_first = now
        elif texts_json:
            run.observe_gap(now, len(texts_json))
        run.t_last = now
        fed = run.stream in FED
        codec = run.codec
        if codec is None:
            seq, i = run.seq, run.tokens
            for tj in texts_json:
                seq += 1
                f = token_frame(seq, i, tj)
                i += 1
                run.transcript.append(f)
                if fed:
                    run.outbox.append(f)
            run.seq, run.tokens = seq, i
        else:
            run.tokens += len(texts_json)
            for f in codec.tokens(run, texts_json):
                run.transcript.append(f)
                if fed:
                    run.outbox.append(f)
            if codec.stopped:
                self._end(run, "stop", now)  # a stop string: the engine is told to stop
                return
        if not (fed and self.coalesce > 1 and self._hold(run, len(texts_json), now)):
            self._mark(run)
        if (run.tokens_budget is not None or run.cost_budget is not None) and run.over_budget(now):
            self._end(run, "budget", now)

    def _hold(self, run: Run, n: int, now: float) -> bool:
        """Whether coalescing holds these frames back (for the next batch or a deadline)."""
        if run.tokens == n:
            return False  # the first token(s): never held
        run.held += n
        if run.held >= self.coalesce:
            run.held = 0
            run.release_at = 0.0
            return False
        if not run.release_at:
            run.release_at = now + self.coalesce_s
            self._schedule(run, now)
        return True

    def usage(self, rid: int, prompt_tokens: int) -> None:
        run = self.by_rid.get(rid)
        if run is not None:
            run.tokens_in = prompt_tokens

    def embedding(self, rid: int, vectors: list[list[float]], now: float) -> None:
        run = self.by_rid.get(rid)
        if run is None:
            return
        if run.codec is not None:
            run.codec.vectors = vectors
        else:
            run.seq += 1
            self._emit(run, frame("embedding", run.seq, {"vectors": vectors}))
        self._end(run, "stop", now, engine_done=True)

    def finish(self, rid: int, reason: str, now: float) -> None:
        run = self.by_rid.get(rid)
        if run is not None:
            self._end(run, reason, now, engine_done=True)

    def error(
        self, rid: int, code: str, message: str, retry_after_ms: int | None, now: float
    ) -> None:
        run = self.by_rid.get(rid)
        if run is not None:
            err = OrchdError(
                code, message, engine=self.replica.engine, retry_after_ms=retry_after_ms
            )
            self._fail(run, err, now, engine_done=True)

    # ---------------------------------------------------------------- engine lifecycle

    def start(self) -> None:
        self.engines.start()

    def announce(self) -> None:
        """What this supervisor holds, after each Hello (orchd/core/recovery.py)."""
        self._send(running(self.replica.id, self.runs.values(), self.ended.values()))

    def engine_ready(self, eid: int, version: str, now: float) -> None:
        self.engines.on_ready(eid, version, now)

    def engine_start_failed(self, eid: int, error: str, now: float) -> None:
        self.engines.on_start_failed(eid, error)

    def prepared(self, req_id: int, eid: int, ok: bool, version: str, error: str) -> None:
        self.engines.on_prepared(req_id, eid, ok, version, error)

    def engine_dead(self, eid: int, reason: str, now: float) -> None:
        """Its tasks fail with WORKER_RESET; the serving engine is restarted."""
        self._log("error", "engine died", replica_id=self.replica.id, reason=reason)
        err = self.engines.worker_reset(f"died: {reason}")
        for run in [r for r in self.runs.values() if r.engine == eid]:
            self._fail(run, err, now, engine_done=True)
        self.engines.on_dead(eid, reason, now)

    # ---------------------------------------------------------------- task events

    def _emit(self, run: Run, f: bytes) -> None:
        run.transcript.append(f)
        if run.stream in FED:
            run.outbox.append(f)
        self._mark(run)

    def _mark(self, run: Run) -> None:
        if not run.dirty:
            run.dirty = True
            self.dirty.append(run)

    def _close(self, run: Run, now: float) -> None:
        run.ended = True
        run.ended_at = now
        run.release_at = 0.0
        if run.stream in FED:
            run.stream = step(run.stream, Ev.TERMINAL)
        self.runs.pop(run.task_id, None)
        self.by_rid.pop(run.rid, None)
        self.ended[run.task_id] = run
        self.ended_order.append(run)

    def _end(self, run: Run, reason: str, now: float, *, engine_done: bool = False) -> None:
        _, decode_ms, decode_time_ms = run.timings(now)
        version = self.engines.version(run.engine)
        keep = self.cfg.artifacts.transcripts
        if run.codec is not None:  # OpenAI's shapes carry no artifact id: stored with its end
            self._emit(run, run.codec.end(run, reason))
            if keep:
                self._send(p.PutArtifact(run.transcript_doc(self.replica, version, reason)[1]))
        else:
            aid = None
            if keep:
                data = end_data(run.tokens, decode_ms, decode_time_ms, reason)
                terminal = {"type": "end", "id": run.seq + 1, "data": data}
                aid, doc = run.transcript_doc(self.replica, version, reason, terminal)
                self._send(p.PutArtifact(doc))
            run.seq += 1
            end = end_frame(run.seq, run.tokens, decode_ms, decode_time_ms, reason, aid)
            self._emit(run, end)
        self.engines.release(run.engine, run.rid, engine_done=engine_done)
        run.engine = NO_ENGINE
        run.end_reason = reason
        self._close(run, now)
        self._send(run.ended_msg(reason, now))
        self._log(
            "info",
            "stream ended",
            task_id=run.task_id,
            replica_id=self.replica.id,
            reason=reason,
            tokens_in=run.tokens_in,
            tokens_out=run.tokens,
            decode_time_ms=round(decode_time_ms, 3),
        )

    def _fail(self, run: Run, err: OrchdError, now: float, *, engine_done: bool = False) -> None:
        if run.codec is not None:
            self._emit(run, run.codec.error(run, err.envelope()))
        else:
            run.seq += 1
            self._emit(run, error_frame(run.seq, err.envelope()))
        self.engines.release(run.engine, run.rid, engine_done=engine_done)
        run.engine = NO_ENGINE
        run.end_reason, run.error_code = "error", err.code.value
        self._close(run, now)
        self._send(run.ended_msg("error", now, err.code.value))
        self._log(
            "warning", "task failed", task_id=run.task_id, code=err.code.value, message=err.message
        )

    # ---------------------------------------------------------------- publishing

    def flush(self) -> list[Record]:
        """Every dirty stream's frames as one record each (held frames stay held)."""
        records = self.direct
        self.direct = []
        for run in self.dirty:
            run.dirty = False
            if run.frontend >= 0 and run.outbox:
                out = run.outbox
                payload = out[0] if len(out) == 1 else b"".join(out)
                kind = KIND_TERMINAL if run.ended else KIND_DATA
                records.append((run.frontend, run.slot, run.seq, kind, payload))
                run.outbox = []
        self.dirty.clear()
        return records

    def rings_backed_up(self, stuck: bool) -> None:
        """A frontend is behind (its ring is full): stop reading the engines until it has room;
        the engines then stall on their own bounded queues, and nothing is dropped."""
        if stuck != self.paused:
            self.paused = stuck
            self.out.append(PauseReading(stuck))

    # ---------------------------------------------------------------- time

    def _deadline(self, run: Run) -> float:
        """The run's next check: decode timeout, time budget, `metrics` frame, or release."""
        at = (run.t_last or run.t_start) + self.decode_timeout_s
        if run.time_budget_ms is not None:
            at = min(at, run.t_start + run.time_budget_ms / 1000.0)
        if self.metrics_s > 0 and run.stream in FED and run.codec is None:
            at = min(at, run.t_metrics + self.metrics_s)
        if run.release_at:
            at = min(at, run.release_at)
        return at

    def _schedule(self, run: Run, now: float) -> None:
        self.checks.schedule(run, self._deadline(run), now)

    def next_deadline(self) -> float:
        at = self.next_heartbeat
        check = self.checks.next_at()
        if check is not None:
            at = min(at, check)
        if self.ended_order:
            at = min(at, self.ended_order[0].ended_at + self.retention_s)
        return at

    def tick(self, now: float) -> None:
        if now >= self.next_heartbeat:
            self._send(p.Heartbeat({r.task_id: r.tokens for r in self.runs.values()}))
            self.next_heartbeat = now + self.heartbeat_s
        itl: list[float] = []
        for run in self.checks.due(now):
            self._check(run, now, itl)
        while self.ended_order and now - self.ended_order[0].ended_at >= self.retention_s:
            gone = self.ended_order.popleft()
            if self.ended.get(gone.task_id) is gone:
                del self.ended[gone.task_id]

    def _check(self, run: Run, now: float, itl: list[float]) -> None:
        if run.release_at and now >= run.release_at:
            run.release_at = 0.0
            run.held = 0
            self._mark(run)
        if run.time_budget_ms is not None and now >= run.t_start + run.time_budget_ms / 1000.0:
            self._end(run, "budget", now)
            return
        if now >= (run.t_last or run.t_start) + self.decode_timeout_s:
            err = OrchdError(
                Code.DECODE_TIMEOUT,
                f"no token for {self.replica.decode_timeout_ms} ms",
                engine=self.replica.engine,
                pool_id=self.replica.pool_id,
            )
            self._fail(run, err, now)
            return
        metrics_due = self.metrics_s > 0 and now >= run.t_metrics + self.metrics_s
        if metrics_due and run.stream in FED and run.codec is None:
            if not itl:
                itl.append(recent_itl_ms(itertools.islice(self.runs.values(), ITL_SAMPLE)))
            run.t_metrics = now
            self._emit(run, run.metrics_frame(now, self.queue_depth, itl[0]))
        self._schedule(run, now)
