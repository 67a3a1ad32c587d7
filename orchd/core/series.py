"""Labelled metric series the scheduler core records at each event (pure: values in, counts out).

Two families live side by side. The seeds' lint names (``tasks_enqueued_total``,
``latency_first_token_ms``, ...) with the labels the contract's ``metrics.lint.json`` requires,
and Prometheus-native ones (``orchd_*``: seconds, ``_total`` counters) labelled by model and
pool. The shell (``orchd/scheduler/metrics.py``) only renders what is here.

Cardinality: every value of a budgeted label goes through :class:`LabelBudget`. The first N
distinct values of a label are kept; later ones fold into ``"other"`` (:data:`BUDGETS`, also
written in ``contracts/metrics.lint.json``). Client-chosen values (an engine name, a cancel
reason) therefore cannot grow ``/metrics`` without bound.

Times are ms in, as the core keeps them; the native histograms store seconds.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from orchd.core.placement import ReplicaView
from orchd.core.pools import PoolState
from orchd.core.tasks import Task

# Distinct values kept per label before the rest fold into OTHER.
BUDGETS: dict[str, int] = {
    "engine": 4,
    "priority": 8,
    "reason": 16,
    "pool_id": 256,
    "replica_id": 1024,
    "model": 64,
}
OTHER = "other"
UNPLACED = "none"  # replica_id of a task not (yet) on a replica
MEMO_LIMIT = 4096  # label tuples remembered folded
UNKNOWN_VERSION = "unknown"  # engine_version before a replica reports one

LATENCY_MS_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
SECONDS_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 4, 16, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class LabelBudget:
    """Maps label values into their budget: the configured values (:meth:`keep`) and the
    first others up to ``BUDGETS[label]`` distinct values stay, later ones are ``"other"``.
    Labels without a budget pass through."""

    def __init__(self, budgets: dict[str, int] | None = None) -> None:
        self.budgets = dict(BUDGETS if budgets is None else budgets)
        self.seen: dict[str, set[str]] = {k: set() for k in self.budgets}

    def keep(self, label: str, value: str) -> None:
        """A value that always keeps its name (configured engines, pools, replicas): it
        counts against the budget, but a flood of other values cannot fold it."""
        self.seen.setdefault(label, set()).add(value)
        self.budgets.setdefault(label, 0)

    def fold(self, label: str, value: str) -> str:
        seen = self.seen.get(label)
        if seen is None or value in seen:
            return value
        if len(seen) < self.budgets[label]:
            seen.add(value)
            return value
        return OTHER


@dataclass(slots=True)
class Hist:
    """A histogram's buckets (not cumulative; the last is +Inf), sum and count."""

    bounds: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, v: float) -> None:
        self.counts[bisect_left(self.bounds, v)] += 1  # bucket i holds v <= bounds[i]
        self.total += v
        self.count += 1

    def merge(self, counts: Sequence[int], total: float) -> None:
        """Add buckets counted elsewhere (same bounds), e.g. by a supervisor."""
        if len(counts) != len(self.counts):
            return  # another build's bounds: dropped rather than misfiled
        for i, n in enumerate(counts):
            self.counts[i] += n
        self.count += sum(counts)
        self.total += total


# label tuples, in the order the lint file lists them
Placed = tuple[str, str, str, str]  # engine, engine_version, pool_id, replica_id
Native = tuple[str, str]  # model, pool
Key = tuple[str, ...]


@dataclass(slots=True)
class Series:
    """Counters and histograms by label tuple (the lint file's label order), fed one event at
    a time by the core; every budgeted label value is folded on the way in."""

    budget: LabelBudget = field(default_factory=LabelBudget)
    enqueued: dict[Key, int] = field(default_factory=dict)  # Placed + priority
    started: dict[Key, int] = field(default_factory=dict)  # Placed + priority
    canceled: dict[Key, int] = field(default_factory=dict)  # Placed + reason
    rejected: dict[Key, int] = field(default_factory=dict)  # engine, reason
    tokens_in: dict[Key, int] = field(default_factory=dict)
    tokens_out: dict[Key, int] = field(default_factory=dict)
    backpressure: dict[Key, int] = field(default_factory=dict)  # engine, policy
    placements: dict[Key, int] = field(default_factory=dict)  # outcome, pinned, fallback
    candidates_considered: int = 0  # replicas the latest placement looked at
    first_token_ms: dict[Key, Hist] = field(
        default_factory=dict
    )  # engine, engine_version, pool_id, priority
    decode_ms: dict[Key, Hist] = field(default_factory=dict)
    # Prometheus-native, by (model, pool)
    ttft_s: dict[Key, Hist] = field(default_factory=dict)
    queue_s: dict[Key, Hist] = field(default_factory=dict)
    inter_token_s: dict[Key, Hist] = field(default_factory=dict)
    e2e_s: dict[Key, Hist] = field(default_factory=dict)
    prompt_tokens: dict[Key, Hist] = field(default_factory=dict)
    generation_tokens: dict[Key, Hist] = field(default_factory=dict)
    requests: dict[Key, int] = field(default_factory=dict)  # + outcome
    engine_restarts: dict[Key, int] = field(default_factory=dict)  # pool, replica
    verifications: dict[Key, int] = field(default_factory=dict)  # result, reason, engine
    memo: dict[Key, Key] = field(default_factory=dict)  # raw label tuple -> folded

    @classmethod
    def configured(
        cls,
        replicas: Iterable[ReplicaView],
        pools: Iterable[PoolState],
        priorities: Iterable[str],
    ) -> Series:
        """Series whose budgets always keep the configured names."""
        s = cls()
        for r in replicas:
            s.budget.keep("engine", r.engine)
            s.budget.keep("pool_id", r.pool_id)
            s.budget.keep("replica_id", r.id)
        for pool in pools:
            s.budget.keep("pool_id", pool.id)
            s.budget.keep("model", pool.model_ref)
        for prio in priorities:
            s.budget.keep("priority", prio)
        return s

    # ------------------------------------------------------------ labels

    def f(self, label: str, value: str) -> str:
        return self.budget.fold(label, value)

    def placed(self, engine: str, version: str, pool_id: str, replica_id: str) -> Placed:
        raw = (engine, version, pool_id, replica_id)
        got = self.memo.get(raw)
        if got is None:
            got = (
                self.f("engine", engine),
                version or UNKNOWN_VERSION,
                self.f("pool_id", pool_id),
                self.f("replica_id", replica_id or UNPLACED),
            )
            self._remember(raw, got)
        return got  # type: ignore[return-value]

    def native(self, model: str, pool_id: str) -> Native:
        raw = (model, pool_id)
        got = self.memo.get(raw)
        if got is None:
            got = (self.f("model", model), self.f("pool_id", pool_id))
            self._remember(raw, got)
        return got  # type: ignore[return-value]

    def _remember(self, raw: Key, folded: Key) -> None:
        """A value's fold never changes (kept stays kept, a full budget stays full), so label
        tuples are folded once; the memo is bounded, past that they are folded each time."""
        if len(self.memo) < MEMO_LIMIT:
            self.memo[raw] = folded

    @staticmethod
    def bump(d: dict[Key, int], k: tuple[str, ...], n: int = 1) -> None:
        d[k] = d.get(k, 0) + n

    @staticmethod
    def hist(d: dict[Key, Hist], k: tuple[str, ...], bounds: Sequence[float]) -> Hist:
        h = d.get(k)
        if h is None:
            h = d[k] = Hist(bounds)
        return h

    # ------------------------------------------------------------ events

    def on_rejected(self, engine: str, code: str, policy: str, backpressure: bool) -> None:
        self.bump(self.rejected, (self.f("engine", engine), self.f("reason", code)))
        if backpressure:
            self.bump(self.backpressure, (self.f("engine", engine), policy))

    def on_refused(self, model: str, pool_id: str, pinned: bool) -> None:
        """A request admission refused: its placement and its outcome."""
        self.bump(self.placements, ("rejected", _b(pinned), "false"))
        self.bump(self.requests, (*self.native(model, pool_id), "rejected"))

    def on_enqueued(self, where: Placed, priority: str) -> None:
        self.bump(self.enqueued, (*self.placed(*where), self.f("priority", priority)))

    def on_queued_unplaced(self, pinned: bool) -> None:
        self.bump(self.placements, ("queued", _b(pinned), "false"))

    def on_started(
        self,
        where: Placed,
        priority: str,
        native: Native,
        queue_ms: float,
        pinned: bool,
        fallback: bool,
        candidates: int,
    ) -> None:
        self.bump(self.started, (*self.placed(*where), self.f("priority", priority)))
        self.bump(self.placements, ("placed", _b(pinned), _b(fallback)))
        self.candidates_considered = candidates
        self.hist(self.queue_s, self.native(*native), SECONDS_BUCKETS).observe(queue_ms / 1000)

    def on_canceled(self, where: Placed, reason: str) -> None:
        self.bump(self.canceled, (*self.placed(*where), self.f("reason", reason)))

    def on_ran(
        self,
        where: Placed,
        priority: str,
        native: Native,
        tokens_in: int,
        tokens_out: int,
        first_token_from_arrival_ms: float | None,
        decode_ms: float,
        gap_counts: Sequence[int],
        gap_sum_s: float,
    ) -> None:
        """A task that ran ended at its supervisor, with what it measured."""
        where, native = self.placed(*where), self.native(*native)
        self.bump(self.tokens_in, where, tokens_in)
        self.bump(self.tokens_out, where, tokens_out)
        pk = (*where[:3], self.f("priority", priority))
        if first_token_from_arrival_ms is not None:
            self.hist(self.first_token_ms, pk, LATENCY_MS_BUCKETS).observe(
                first_token_from_arrival_ms
            )
            self.hist(self.ttft_s, native, SECONDS_BUCKETS).observe(
                first_token_from_arrival_ms / 1000.0
            )
        if decode_ms:
            self.hist(self.decode_ms, pk, LATENCY_MS_BUCKETS).observe(decode_ms)
        if tokens_in:
            self.hist(self.prompt_tokens, native, TOKEN_BUCKETS).observe(tokens_in)
        self.hist(self.generation_tokens, native, TOKEN_BUCKETS).observe(tokens_out)
        if gap_counts:
            self.hist(self.inter_token_s, native, SECONDS_BUCKETS).merge(gap_counts, gap_sum_s)

    def on_ended(self, native: Native, outcome: str, e2e_ms: float) -> None:
        """Every admitted task's end, however it came."""
        native = self.native(*native)
        self.bump(self.requests, (*native, outcome))
        self.hist(self.e2e_s, native, SECONDS_BUCKETS).observe(e2e_ms / 1000.0)

    def on_verified(self, result: str, reason: str, engine: str) -> None:
        key = (result, self.f("reason", reason), self.f("engine", engine))
        self.bump(self.verifications, key)

    def on_engine_restart(self, pool_id: str, replica_id: str) -> None:
        key = (self.f("pool_id", pool_id), self.f("replica_id", replica_id))
        self.bump(self.engine_restarts, key)


def _b(flag: bool) -> str:
    return "true" if flag else "false"


def outcome(reason: str, error_code: str) -> str:
    """``orchd_requests_total``'s outcome of a task that ended with ``reason``."""
    if reason == "canceled":
        return "canceled"
    if error_code == "QUEUE_FULL_DROP_LRU":
        return "rejected"  # admitted, then dropped from a full queue for a newer task
    if reason == "error" or error_code:
        return "error"
    return "ok"


def where_of(t: Task, replicas: dict[str, ReplicaView], pools: dict[str, PoolState]) -> Placed:
    """engine, engine_version, pool_id, replica_id of a task: its replica's once placed, else
    its preferred pool's (replica ``none``)."""
    r = replicas.get(t.replica) if t.replica else None
    if r is not None:
        return (r.engine, r.engine_version, r.pool_id, r.id)
    pool = pools.get(t.pools[0]) if t.pools else None
    if pool is None:
        return (t.spec.engine, "", "", "")
    return (pool.engine, pool.engine_version, pool.id, "")


def pool_of(t: Task, replicas: dict[str, ReplicaView]) -> str:
    r = replicas.get(t.replica) if t.replica else None
    if r is not None:
        return r.pool_id
    return t.pools[0] if t.pools else ""


def pinned(t: Task) -> bool:
    return bool(t.spec.placement and t.spec.placement.get("mode") == "pin")
