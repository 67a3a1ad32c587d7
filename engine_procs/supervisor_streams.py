"""What happens to a task's stream in the supervisor: an engine's tokens, finish and errors
come in through the sink, each event is encoded once as SSE bytes into the task's transcript
and outbox, and after each engine step every dirty stream's frames go into its frontend's
ring with one publish per ring. A mixin of :class:`engine_procs.supervisor.Supervisor`."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import TYPE_CHECKING

from engine_procs.adapters.base import EngineAdapter
from engine_procs.publisher import Publisher
from engine_procs.runs import Run
from ipc import protocol as p
from ipc.frames import KIND_DATA, KIND_TERMINAL, end_frame, error_frame
from ipc.frames import token_frame as _token_frame
from orchd import log
from orchd.config import Config, Replica
from orchd.core.errors import OrchdError

BACKLOG_RETRY_S = 0.0005


def _now() -> float:
    return time.monotonic()


class TaskStreams:
    # State the supervisor owns (declared here for the type checker).
    cfg: Config
    replica: Replica
    rings: Publisher
    runs: dict[str, Run]
    by_rid: dict[int, Run]
    ended: dict[str, Run]
    ended_order: deque[Run]
    dirty: list[Run]
    flush_scheduled: bool
    coalesce: int
    coalesce_s: float
    adapter: EngineAdapter
    _backlog_task: asyncio.Task[None] | None

    if TYPE_CHECKING:

        def send(self, msg: p.Message) -> None: ...
        def _release_adapter(self, run: Run) -> None: ...

    # ---------------------------------------------------------------- sink (adapter -> us)

    def on_tokens(self, rid: int, texts_json: list[bytes]) -> None:
        run = self.by_rid.get(rid)
        if run is None:
            return  # aborted: late tokens are dropped here, never reach a stream
        now = _now()
        if run.tokens == 0:
            run.t_first = now
        run.t_last = now
        seq, i = run.seq, run.tokens
        for tj in texts_json:
            seq += 1
            f = _token_frame(seq, i, tj)
            i += 1
            run.transcript.append(f)
            if run.frontend >= 0:
                run.outbox.append(f)
        run.seq, run.tokens = seq, i
        # Coalescing may hold these frames for the next batch or its timer.
        held = run.frontend >= 0 and self.coalesce > 1 and self._hold(run, len(texts_json))
        if not held:
            self._mark(run)
        if (run.tokens_budget is not None or run.cost_budget is not None) and run.over_budget(now):
            run.adapter.abort(rid)
            self._end(run, "budget")

    def _hold(self, run: Run, n: int) -> bool:
        """Coalescing (``stream_interval_tokens``): the first token goes at once, then every
        N tokens or after ``stream_interval_ms``, whichever comes first."""
        if run.tokens == n:
            return False  # the first token(s): never held
        run.held += n
        if run.held >= self.coalesce:
            run.held = 0
            if run.timer is not None:
                run.timer.cancel()
                run.timer = None
            return False
        if run.timer is None:
            run.timer = asyncio.get_running_loop().call_later(
                self.coalesce_s, self._release_held, run
            )
        return True

    def _release_held(self, run: Run) -> None:
        run.timer = None
        run.held = 0
        if not run.ended:
            self._mark(run)

    def on_usage(self, rid: int, prompt_tokens: int) -> None:
        run = self.by_rid.get(rid)
        if run is not None:
            run.tokens_in = prompt_tokens

    def on_finish(self, rid: int, reason: str) -> None:
        run = self.by_rid.get(rid)
        if run is not None:
            self._end(run, reason)

    def on_error(
        self, rid: int, code: str, message: str, retry_after_ms: int | None = None
    ) -> None:
        run = self.by_rid.get(rid)
        if run is not None:
            err = OrchdError(
                code, message, engine=self.replica.engine, retry_after_ms=retry_after_ms
            )
            self._fail(run, err)

    # ---------------------------------------------------------------- task events

    def _emit(self, run: Run, f: bytes) -> None:
        run.transcript.append(f)
        if run.frontend >= 0:
            run.outbox.append(f)
        self._mark(run)

    def _mark(self, run: Run) -> None:
        if not run.dirty:
            run.dirty = True
            self.dirty.append(run)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def _close(self, run: Run) -> None:
        if run.timer is not None:
            run.timer.cancel()
            run.timer = None
        run.ended = True
        run.ended_at = _now()
        self.runs.pop(run.task_id, None)
        self.by_rid.pop(run.rid, None)
        self.ended[run.task_id] = run
        self.ended_order.append(run)

    def _end(self, run: Run, reason: str) -> None:
        now = _now()
        decode_ms = (now - run.t_start) * 1000.0
        decode_time_ms = (run.t_last - run.t_first) * 1000.0 if run.tokens else 0.0
        aid = None
        if self.cfg.artifacts.transcripts:
            aid, doc = run.transcript_doc(self.replica, self.adapter.engine_version, reason)
            self.send(p.PutArtifact(doc))
        run.seq += 1
        self._emit(run, end_frame(run.seq, run.tokens, decode_ms, decode_time_ms, reason, aid))
        self._release_adapter(run)
        self._close(run)
        if reason != "canceled":
            self.send(
                p.TaskEnded(
                    run.task_id,
                    reason,
                    run.tokens,
                    tokens_in=run.tokens_in,
                    first_token_ms=(run.t_first - run.t_start) * 1000.0 if run.tokens else 0.0,
                    decode_ms=decode_ms,
                )
            )
        log.info(
            "stream ended",
            task_id=run.task_id,
            replica_id=self.replica.id,
            reason=reason,
            tokens_out=run.tokens,
            decode_time_ms=round(decode_time_ms, 3),
        )

    def _terminal_error(self, run: Run, err: OrchdError) -> None:
        run.seq += 1
        self._emit(run, error_frame(run.seq, err.envelope()))
        if run.adapter is not None:
            run.adapter.abort(run.rid)
        self._release_adapter(run)
        self._close(run)

    def _fail(self, run: Run, err: OrchdError) -> None:
        self._terminal_error(run, err)
        self.send(p.TaskEnded(run.task_id, "error", run.tokens, error_code=err.code.value))
        log.warning("task failed", task_id=run.task_id, code=err.code.value, message=err.message)

    # ---------------------------------------------------------------- publishing

    def flush(self) -> None:
        """Move every dirty stream's frames into its ring: one record per stream, one publish
        per ring, one doorbell at most."""
        self.flush_scheduled = False
        rings = self.rings
        for run in self.dirty:
            run.dirty = False
            if run.frontend >= 0 and run.outbox:
                out = run.outbox
                payload = out[0] if len(out) == 1 else b"".join(out)
                kind = KIND_TERMINAL if run.ended else KIND_DATA
                rings.add(run.frontend, (run.slot, run.seq, kind, payload))
                run.outbox = []
            if run.ended and run.frontend >= 0 and not run.provisional:
                run.transcript = []  # delivered: nobody will replay it
        self.dirty.clear()
        if rings.publish() and self._backlog_task is None:
            # A frontend is behind: stop reading the engine until its ring has room again.
            self.adapter.paused = True
            self._backlog_task = asyncio.get_running_loop().create_task(self._drain_backlog())

    async def _drain_backlog(self) -> None:
        try:
            while self.rings.pending():
                await asyncio.sleep(BACKLOG_RETRY_S)
                self.flush()
        finally:
            self._backlog_task = None
            self.adapter.resume()
