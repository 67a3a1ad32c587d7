"""Every message that crosses a process boundary, as tagged msgspec Structs (msgpack on the wire).

Topology (all over ZeroMQ ``ipc://`` sockets in the run directory):

    frontend  DEALER ──┐
    supervisor DEALER ─┼──▶ scheduler ROUTER   (request/reply by ``req_id``, plus notices)
    launcher  DEALER ──┘
    supervisor PAIR ◀──▶ engine PAIR          (mock or torch: ipc/engine_protocol.py)

Each peer opens with ``Hello``; the scheduler answers ``Welcome`` carrying the protocol version,
and refuses a peer speaking another version. Peers send ``Heartbeat`` every second and a
``Goodbye`` before a clean exit. No pickle anywhere.
"""

from __future__ import annotations

from typing import Any

import msgspec

from ipc.engine_protocol import EngAbort as EngAbort
from ipc.engine_protocol import EngEmbedding as EngEmbedding
from ipc.engine_protocol import EngineMessage as EngineMessage
from ipc.engine_protocol import EngReady as EngReady
from ipc.engine_protocol import EngStep as EngStep
from ipc.engine_protocol import EngSubmit as EngSubmit
from ipc.engine_protocol import EngTextStep as EngTextStep
from ipc.engine_protocol import decode_engine as decode_engine
from ipc.reannounce import HeldStream as HeldStream
from ipc.reannounce import Rehello as Rehello
from ipc.reannounce import Running as Running
from ipc.reannounce import RunningTask as RunningTask
from ipc.reannounce import Streams as Streams

PROTOCOL_VERSION = 1


class _Msg(msgspec.Struct, tag=True, array_like=True, omit_defaults=True):
    pass


# ---------------------------------------------------------------- shared value types


class TaskSpec(msgspec.Struct, array_like=True, omit_defaults=True):
    """What a task asks of an engine: the validated body of ``POST /v1/tasks``."""

    task_id: str
    session_id: str
    workload: str
    model_ref: str
    engine: str
    ctx: int
    priority: str
    max_tokens: int
    deadline_ms: int
    api_key_id: str = ""
    seed: int | None = None
    determinism: str | None = None
    sampler_profile_version: str | None = None
    prompt: str | None = None
    inputs: list[str] | None = None
    expected_tokens: int | None = None
    kv_hint: str | None = None
    placement: dict[str, Any] | None = None
    temperature: float | None = None
    top_p: float | None = None
    # The OpenAI-compatible routes: the response's shape ("native" = orchd's SSE events,
    # else "chat" | "completions" | "embeddings"), whether it streams, the chat turns
    # (role, content), stop strings, usage in the stream ("" | "final" | "continuous"),
    # and the model name and creation time (unix s) the response echoes.
    api: str = "native"
    stream: bool = True
    messages: list[tuple[str, str]] | None = None
    stop: list[str] | None = None
    stream_usage: str = ""
    model: str = ""
    created: int = 0
    encoding_format: str = "float"  # embeddings: "float" lists or "base64" float32 bytes
    # The correlation id of the request that submitted the task: every process's log lines
    # about the task carry it (orchd/log.py bind_task).
    cid: str = ""


class ErrorInfo(msgspec.Struct, array_like=True, omit_defaults=True):
    code: str
    message: str
    engine: str | None = None
    retry_after_ms: int | None = None
    pool_id: str | None = None
    policy_label: str | None = None
    param: str | None = None  # the request field at fault (OpenAI's error ``param``)


# ---------------------------------------------------------------- handshake and liveness


class Hello(_Msg):
    role: str  # "frontend" | "supervisor" | "launcher"
    ident: str
    pid: int
    version: int = PROTOCOL_VERSION
    replica_id: str = ""  # supervisors only


class Welcome(_Msg):
    version: int = PROTOCOL_VERSION
    accepted: bool = True
    reason: str = ""


class Heartbeat(_Msg):
    # From a supervisor: tokens so far of each task it runs (GET /v1/tasks/{id} shows them).
    progress: dict[str, int] = msgspec.field(default_factory=dict)


class Goodbye(_Msg):
    reason: str = ""


# ---------------------------------------------------------------- frontend -> scheduler


class Submit(_Msg):
    req_id: int
    task: TaskSpec
    # A provisional stream the admitting frontend opened for this task (-1: none): events go
    # there from the start, so a GET on that frontend needs no round trip to the scheduler.
    frontend: int = -1
    slot: int = 0


class Claim(_Msg):
    """A client opened the provisional stream of ``task_id`` (frontend -> scheduler ->
    supervisor): it is a real stream now, and its transcript need not be kept."""

    task_id: str


class Unsubscribe(_Msg):
    """The frontend dropped the unclaimed provisional stream of ``task_id`` (it waited too long
    or outgrew its buffer), or the client of the stream in ``slot`` left before its terminal
    (the task runs on for ``limits.resume_grace_ms``); a later GET replays the transcript."""

    task_id: str
    slot: int = 0  # 0: the provisional stream


class Release(_Msg):
    """Drop the provisional stream in ``slot``: the task is being streamed elsewhere."""

    task_id: str
    slot: int


class Detach(_Msg):
    """Stop feeding the task's stream (its subscriber is gone); keep the transcript."""

    task_id: str


class Subscribe(_Msg):
    req_id: int
    task_id: str
    frontend: int
    slot: int
    after_seq: int = -1  # Last-Event-ID: feed the events after it (and take the stream over)


class Cancel(_Msg):
    req_id: int
    task_id: str
    reason: str = "client"


class MetricsQuery(_Msg):
    req_id: int


class FrontendStats(_Msg):
    """A frontend's own counters (totals since it started), sent each heartbeat and before
    each ``MetricsQuery``: the scheduler's exposition carries every frontend's, so any
    frontend answering a scrape shows them all."""

    frontend: int
    streams_open: int
    client_disconnects: int
    stream_overflows: int


class Query(_Msg):
    """A control-plane or session request the scheduler answers with ``Reply`` or ``Failed``.

    ``op`` names it (``session.get``, ``pool.drain``, ``catalog.create``, ...); ``args`` holds
    its validated arguments; ``key`` is the caller's API key id."""

    req_id: int
    op: str
    args: dict[str, Any]
    key: str = ""


class FenceDone(_Msg):
    """The frontend has written a stream's terminal frame to its socket (answers ``Fence``)."""

    req_id: int


# ---------------------------------------------------------------- scheduler -> frontend


class Budgets(msgspec.Struct, array_like=True, omit_defaults=True, frozen=True):
    """What the task's session has left; None = unlimited."""

    tokens: int | None = None
    time_ms: int | None = None
    cost: float | None = None


class Admitted(_Msg):
    req_id: int
    task_id: str
    queue_position: int
    predicted_start_ms: int
    # Advice to pace further submissions: the expected time until a slot frees while the
    # queue is over half full, else 0.
    backoff_ms: int = 0
    budgets: Budgets = Budgets()


class Subscribed(_Msg):
    req_id: int
    task_id: str
    budgets: Budgets = Budgets()
    codec: str = "native"  # the shape of the task's frames: "native" | "openai"


class Done(_Msg):
    """Generic success reply (cancel, ...)."""

    req_id: int


class Failed(_Msg):
    req_id: int
    error: ErrorInfo


class Reply(_Msg):
    req_id: int
    body: Any
    status: int = 200


class MetricsText(_Msg):
    req_id: int
    text: bytes


class Fence(_Msg):
    """Drain rings, flush the stream in ``slot`` to its socket, then answer ``FenceDone``."""

    req_id: int
    slot: int


class StreamFail(_Msg):
    """End the stream in ``slot`` with an ``error`` event written by the frontend itself
    (the producer that would have written it is gone, or never started); then ``FenceDone``."""

    req_id: int
    slot: int
    task_id: str
    error: ErrorInfo


class StreamEnd(_Msg):
    """End the stream in ``slot`` with an ``end`` event (a task canceled while queued);
    then ``FenceDone``."""

    req_id: int
    slot: int
    task_id: str
    reason: str


# ---------------------------------------------------------------- scheduler <-> supervisor


class Dispatch(_Msg):
    task: TaskSpec
    queue_position: int
    predicted_start_ms: int
    frontend: int = -1  # -1: nobody streams it yet
    slot: int = 0
    model_ref: str = ""  # canonical (catalog-resolved) model reference
    placement_reason: str = ""
    queue_depth: int = 0
    deadline_left_ms: int = 0
    # Budgets left to the task's session at dispatch; None = unlimited.
    tokens_budget: int | None = None
    time_budget_ms: int | None = None
    cost_budget: float | None = None
    cost_per_token: float = 0.0
    kv_warm: bool = False
    provisional: bool = False  # the subscriber has not claimed its stream yet


class Attach(_Msg):
    task_id: str
    frontend: int
    slot: int
    after_seq: int = -1  # replay the transcript's events after this id (-1: all of it)


class Abort(_Msg):
    req_id: int
    task_id: str
    reason: str


class AbortDone(_Msg):
    """The supervisor stopped the task. If it was running there, its ``TaskEnded`` (reason
    canceled) came first and its terminal frame is published; if not, nothing was written."""

    req_id: int
    task_id: str


class QueueDepth(_Msg):
    """Broadcast to supervisors when it changes, for `metrics` frames."""

    depth: int


class PutArtifact(_Msg):
    """A supervisor hands a finished transcript (canonical bytes) to the store."""

    doc: bytes


class ReloadPrepare(_Msg):
    """Start an engine with ``model_ref`` beside the serving one; answer ``ReloadReady``."""

    req_id: int
    model_ref: str


class ReloadReady(_Msg):
    req_id: int
    ok: bool
    engine_version: str = ""
    error: str = ""


class ReloadCommit(_Msg):
    """Switch to the prepared engine; the old one finishes its tasks, then stops."""

    req_id: int


class ReloadAbort(_Msg):
    """Drop the prepared engine; the old one keeps serving."""

    req_id: int


class ReplicaStatus(_Msg):
    replica_id: str
    ready: bool
    engine: str
    engine_version: str
    last_error: str = ""
    # Appended (older peers omit them): what a scheduler that forgot this replica needs.
    model_ref: str = ""  # the model it serves now (a reload changes it)
    slots: int = 0
    start_failures: int = 0  # failed starts in a row: > 0 and not ready = cannot load
    circuit_open: bool = False  # its engine's restart circuit breaker is open


class TaskEnded(_Msg):
    task_id: str
    reason: str  # "stop" | "length" | "canceled" | "error"
    tokens_out: int
    tokens_in: int = 0
    error_code: str = ""
    first_token_ms: float = 0.0
    decode_ms: float = 0.0
    # Inter-token time, one observation per token record (batch) after the first: counts per
    # bucket of orchd.core.series.SECONDS_BUCKETS (+Inf last) and their sum in seconds.
    gap_counts: list[int] = []
    gap_sum_s: float = 0.0


# ---------------------------------------------------------------- launcher <-> scheduler


class PeerDown(_Msg):
    ident: str
    reason: str


class DrainAll(_Msg):
    req_id: int
    deadline_ms: int


class ClusterReady(_Msg):
    frontends: int
    replicas: int


class PeersSeen(_Msg):
    """Scheduler -> launcher, every heartbeat: how long ago (ms of the scheduler's own waking
    time) it last heard from each peer. The launcher's watchdog judges the other children by
    it, and the scheduler by the report's arrival."""

    ages_ms: dict[str, int]


Message = (
    Hello
    | Welcome
    | Heartbeat
    | Goodbye
    | Rehello
    | Running
    | Streams
    | Submit
    | Claim
    | Unsubscribe
    | Release
    | Detach
    | Subscribe
    | Cancel
    | MetricsQuery
    | FrontendStats
    | Query
    | FenceDone
    | Admitted
    | Subscribed
    | Done
    | Failed
    | Reply
    | MetricsText
    | Fence
    | StreamFail
    | StreamEnd
    | Dispatch
    | Attach
    | Abort
    | AbortDone
    | QueueDepth
    | PutArtifact
    | ReloadPrepare
    | ReloadReady
    | ReloadCommit
    | ReloadAbort
    | ReplicaStatus
    | TaskEnded
    | PeerDown
    | DrainAll
    | ClusterReady
    | PeersSeen
)

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)

encode = _encoder.encode


def decode(data: bytes) -> Message:
    return _decoder.decode(data)
