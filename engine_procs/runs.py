"""A task running on a supervisor: its stream state, its budgets, and what it leaves behind
(the `metrics` frames it interleaves, the transcript stored as a `trace` artifact)."""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine_procs.adapters.base import EngineRequest
from ipc import protocol as p
from ipc.frames import metrics_frame
from orchd.config import Replica
from orchd.core.artifacts import artifact_id, canonical, transcript_events
from orchd.core.errors import Code, OrchdError
from orchd.core.ownership import Ev, Stream, step
from orchd.core.series import SECONDS_BUCKETS

if TYPE_CHECKING:
    from engine_procs.codecs import OpenAICodec

NO_ENGINE = -1


# Aborts that end a task with an error, not as canceled: reason -> (code, why, retry ms).
STOPS: dict[str, tuple[Code, str, int | None]] = {
    "drained": (Code.POOL_UNAVAILABLE, "task stopped: its pool was drained", 1000),
    "shutdown": (Code.POOL_UNAVAILABLE, "task stopped: orchd is shutting down", 1000),
    "model_retired": (Code.MODEL_DEPRECATED, "task stopped: its model was retired", None),
    # orchd's failure, not the client's: retriable
    "frontend_lost": (
        Code.STREAM_INTERRUPTED,
        "task stopped: the frontend of its stream failed and no client resumed it within "
        "limits.resume_grace_ms",
        0,
    ),
}


@dataclass(slots=True, eq=False)
class Run:
    task_id: str
    rid: int
    spec: p.TaskSpec
    t_start: float
    engine: int = NO_ENGINE  # the engine serving it (two coexist during a reload)
    # Who streams it (orchd/core/ownership.py): the frontend's ring and slot, and the state.
    frontend: int = -1
    slot: int = 0
    stream: Stream = Stream.NONE
    seq: int = 0
    tokens: int = 0
    tokens_in: int = 0  # prompt tokens, as the engine counts them
    t_first: float = 0.0
    t_last: float = 0.0
    # inter-token time per record after the first (orchd.core.series.SECONDS_BUCKETS)
    gap_counts: list[int] = field(default_factory=list)
    gap_sum_s: float = 0.0
    t_metrics: float = 0.0
    ended: bool = False
    ended_at: float = 0.0
    end_reason: str = ""  # once ended (re-announced to a restarted scheduler)
    error_code: str = ""
    dirty: bool = False
    check_at: float = 0.0  # its live entry in the supervisor's deadline heap
    held: int = 0  # token frames held back by coalescing
    release_at: float = 0.0  # when held frames go out at the latest; 0 = none held
    transcript: list[bytes] = field(default_factory=list)
    outbox: list[bytes] = field(default_factory=list)
    # from the dispatch
    deadline_left_ms: int = 0
    tokens_budget: int | None = None
    time_budget_ms: int | None = None
    cost_budget: float | None = None
    cost_per_token: float = 0.0
    kv_warm: bool = False
    codec: OpenAICodec | None = None  # the OpenAI routes' bytes; None: native frames

    @classmethod
    def dispatched(cls, msg: p.Dispatch, rid: int, now: float, engine: int) -> Run:
        """A run of ``msg``'s task on ``engine``, streamed to whoever the dispatch names."""
        run = cls(
            msg.task.task_id,
            rid,
            msg.task,
            now,
            engine=engine,
            t_metrics=now,
            deadline_left_ms=msg.deadline_left_ms,
            tokens_budget=msg.tokens_budget,
            time_budget_ms=msg.time_budget_ms,
            cost_budget=msg.cost_budget,
            cost_per_token=msg.cost_per_token,
            kv_warm=msg.kv_warm,
        )
        if msg.frontend >= 0:
            run.frontend, run.slot = msg.frontend, msg.slot
            if msg.provisional:
                run.stream = step(Stream.NONE, Ev.OPEN)
            else:
                run.stream = step(step(Stream.NONE, Ev.SUBSCRIBE), Ev.ATTACH)
        return run

    def engine_request(self, seed: int) -> EngineRequest:
        spec = self.spec
        return EngineRequest(
            self.rid,
            spec.prompt or "",
            seed,
            spec.max_tokens,
            temperature=spec.temperature,
            top_p=spec.top_p,
            messages=spec.messages,
            stop=spec.stop,
            workload=spec.workload,
            inputs=spec.inputs,
        )

    def timings(self, now: float) -> tuple[float, float, float]:
        """(first token ms, decode ms, decode time ms) of this run ending now."""
        first_ms = (self.t_first - self.t_start) * 1000.0 if self.tokens else 0.0
        decode_ms = (now - self.t_start) * 1000.0
        decode_time_ms = (self.t_last - self.t_first) * 1000.0 if self.tokens else 0.0
        return first_ms, decode_ms, decode_time_ms

    def observe_gap(self, now: float, n: int) -> None:
        """Inter-token time, observed once per record (not per token): the gap since the last
        record, shared by the ``n`` tokens this one carries."""
        per_token = (now - self.t_last) / n
        if not self.gap_counts:
            self.gap_counts = [0] * (len(SECONDS_BUCKETS) + 1)
        self.gap_counts[bisect_left(SECONDS_BUCKETS, per_token)] += 1
        self.gap_sum_s += per_token

    def over_budget(self, now: float) -> str:
        """Which budget ran out, or ''."""
        if self.tokens_budget is not None and self.tokens >= self.tokens_budget:
            return "tokens"
        if self.cost_budget is not None and self.tokens * self.cost_per_token >= self.cost_budget:
            return "cost"
        if self.time_budget_ms is not None and (now - self.t_start) * 1000 >= self.time_budget_ms:
            return "time"
        return ""

    def metrics_frame(self, now: float, queue_depth: int, itl_ms: float) -> bytes:
        elapsed_ms = (now - self.t_start) * 1000.0
        left = self.spec.max_tokens - self.tokens
        need_ms = left * itl_ms
        slack_ms = self.deadline_left_ms - elapsed_ms
        on_time = 1.0 if need_ms <= 0 else max(0.0, min(1.0, slack_ms / need_ms))

        def rem(v: float | None, used: float) -> float | None:
            return None if v is None else round(max(0.0, v - used), 6)

        self.seq += 1
        return metrics_frame(
            self.seq,
            queue_depth,
            round(on_time, 4),
            self.kv_warm,
            (
                rem(self.tokens_budget, self.tokens),
                rem(self.time_budget_ms, elapsed_ms),
                rem(self.cost_budget, self.tokens * self.cost_per_token),
            ),
        )

    def ended_msg(self, reason: str, now: float, error_code: str = "") -> p.TaskEnded:
        """What the scheduler hears of this task's end: its counts and timings."""
        first_ms, decode_ms, _ = self.timings(now)
        return p.TaskEnded(
            self.task_id,
            reason,
            self.tokens,
            tokens_in=self.tokens_in,
            error_code=error_code,
            first_token_ms=first_ms,
            decode_ms=decode_ms,
            gap_counts=self.gap_counts,
            gap_sum_s=self.gap_sum_s,
        )

    def transcript_doc(
        self,
        replica: Replica,
        engine_version: str,
        reason: str,
        terminal: dict[str, Any] | None = None,
    ) -> tuple[str, bytes]:
        """The `trace` artifact of this stream and its id: every event as ``{type, id, data}``,
        then ``terminal`` (the `end` event, less its artifact id: the id is this document's
        hash) where the terminal frame is not among the events already."""
        doc = canonical(
            "trace",
            {
                "task_id": self.task_id,
                "session_id": self.spec.session_id,
                "engine": replica.engine,
                "engine_version": engine_version,
                "pool_id": replica.pool_id,
                "replica_id": replica.id,
                "model_ref": self.spec.model_ref,
                "seed": self.spec.seed,
                "tokens_out": self.tokens,
                "reason": reason,
                "events": [*transcript_events(self.transcript), *([terminal] if terminal else [])],
            },
        )
        return artifact_id(doc), doc


def recent_itl_ms(runs: Iterable[Run]) -> float:
    """Recent per-token time across ``runs`` (a sample of the running ones), for on-time
    estimates in `metrics` frames."""
    spans = [(r.t_last - r.t_first) * 1000.0 / (r.tokens - 1) for r in runs if r.tokens > 1]
    return sum(spans) / len(spans) if spans else 0.0


def started_event(msg: p.Dispatch, replica: Replica, engine_version: str) -> dict[str, Any]:
    """The data of a native stream's `started` event."""
    return {
        "queue_position": msg.queue_position,
        "predicted_start_ms": msg.predicted_start_ms,
        "engine": replica.engine,
        "engine_version": engine_version,
        "pool_id": replica.pool_id,
        "replica_id": replica.id,
        "sampler_profile_version": msg.task.sampler_profile_version,
        "placement": msg.placement_reason,
    }


def abort_error(reason: str, replica: Replica) -> OrchdError | None:
    """The error an abort for ``reason`` ends a running task with (:data:`STOPS`); None:
    ``end canceled`` (the client's own cancel, or its disconnect past
    ``limits.resume_grace_ms``)."""
    stop = STOPS.get(reason)
    if stop is None:
        return None
    code, why, retry = stop
    return OrchdError(
        code, why, engine=replica.engine, pool_id=replica.pool_id, retry_after_ms=retry
    )
