"""Sessions and their budgets (tokens, time, cost), with time passed in.

A session is created by its first task and lives ``ttl_ms`` past its last use. Each task is a
turn; a session holds at most ``max_turns``. Budgets are checked before a task is queued and
never silently truncate: a task whose ``max_tokens`` (or cost) does not fit what is left is
refused. What a task may spend is reserved at admission, so concurrent tasks of one session
cannot overspend together; at the end the reservation is released and the actual use charged.
Time is charged as the task's decode time and, having no reservation, is enforced during the
stream (the stream ends with reason ``budget``).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

from orchd.core.errors import Code, OrchdError


@dataclass(slots=True)
class Limits:
    tokens: int | None = None  # None = unlimited
    time_ms: float | None = None
    cost: float | None = None


@dataclass(slots=True)
class Session:
    id: str
    owner: str  # API key id that created it
    created_ms: float
    last_used_ms: float
    ttl_ms: int
    tokens_left: int | None
    time_left_ms: float | None
    cost_left: float | None
    turns: int = 0
    kv_bytes: int = 0
    last_replica: str = ""
    reserved_tokens: int = 0
    reserved_cost: float = 0.0
    active: int = 0  # tasks admitted and not yet ended

    def expires_ms(self) -> float:
        return self.last_used_ms + self.ttl_ms

    def tokens_available(self) -> int | None:
        return None if self.tokens_left is None else self.tokens_left - self.reserved_tokens

    def cost_available(self) -> float | None:
        return None if self.cost_left is None else self.cost_left - self.reserved_cost


@dataclass(slots=True)
class Grant:
    """What a task reserved at admission; handed back at its end."""

    session_id: str
    tokens: int
    cost: float


class SessionTable:
    def __init__(
        self,
        *,
        ttl_ms: int = 600_000,
        max_turns: int = 8,
        cost_per_token: float = 0.0,
        default: Limits | None = None,
        per_key: dict[str, Limits] | None = None,
    ) -> None:
        self.ttl_ms = ttl_ms
        self.max_turns = max_turns
        self.cost_per_token = cost_per_token
        self.default = default or Limits()
        self.per_key = dict(per_key or {})
        self.sessions: dict[str, Session] = {}
        self._expiry: list[tuple[float, str]] = []  # (expires_ms, id): a heap, lazily checked

    def _touch(self, s: Session, now: float) -> None:
        s.last_used_ms = now
        heapq.heappush(self._expiry, (s.expires_ms(), s.id))

    def limits_for(self, key: str) -> Limits:
        return self.per_key.get(key, self.default)

    def get(self, session_id: str, now: float) -> Session | None:
        s = self.sessions.get(session_id)
        if s is not None and s.expires_ms() <= now and s.active == 0:
            del self.sessions[session_id]
            return None
        return s

    def admit(self, session_id: str, key: str, max_tokens: int, now: float) -> Grant:
        """Check and reserve; raises the typed error that says why a task cannot run."""
        s = self.get(session_id, now)
        new = s is None
        if s is None:  # kept only if the task is admitted
            lim = self.limits_for(key)
            s = Session(session_id, key, now, now, self.ttl_ms, lim.tokens, lim.time_ms, lim.cost)
        elif s.owner != key:
            raise OrchdError(Code.FORBIDDEN, f"session {session_id} belongs to another API key")
        if s.turns >= self.max_turns:
            raise OrchdError(
                Code.INVALID_PARAMS,
                f"session_id: session {session_id} has used its {self.max_turns} turns; "
                "start a new session",
            )
        cost = max_tokens * self.cost_per_token
        left = s.tokens_available()
        if left is not None and max_tokens > left:
            raise OrchdError(
                Code.BUDGET_EXHAUSTED,
                f"max_tokens {max_tokens} exceeds the session's remaining token budget {left}",
                policy_label="budget:tokens",
            )
        cleft = s.cost_available()
        if cleft is not None and cost > cleft + 1e-12:
            raise OrchdError(
                Code.BUDGET_EXHAUSTED,
                f"this task may cost {cost:g}; the session has {cleft:g} left",
                policy_label="budget:cost",
            )
        if s.time_left_ms is not None and s.time_left_ms <= 0:
            raise OrchdError(
                Code.BUDGET_EXHAUSTED,
                "the session's time budget is spent",
                policy_label="budget:time",
            )
        if new:
            self.sessions[session_id] = s
        s.turns += 1
        s.active += 1
        s.reserved_tokens += max_tokens
        s.reserved_cost += cost
        self._touch(s, now)
        return Grant(session_id, max_tokens, cost)

    def settle(
        self,
        grant: Grant,
        *,
        tokens_in: int,
        tokens_out: int,
        decode_ms: float,
        replica: str,
        kv_bytes_per_token: int,
        now: float,
    ) -> None:
        """Release the reservation and charge what the task used."""
        s = self._unreserve(grant)
        if s is None:
            return
        used = tokens_in + tokens_out  # a prompt costs its tokens as an answer does
        if s.tokens_left is not None:
            s.tokens_left -= used
        if s.cost_left is not None:
            s.cost_left -= used * self.cost_per_token
        if s.time_left_ms is not None:
            s.time_left_ms -= decode_ms
        s.kv_bytes += (tokens_in + tokens_out) * kv_bytes_per_token
        if replica:
            s.last_replica = replica
        self._touch(s, now)

    def _unreserve(self, grant: Grant) -> Session | None:
        """Hand back what a task reserved at admission; its session, if it still exists."""
        s = self.sessions.get(grant.session_id)
        if s is not None:
            s.reserved_tokens -= grant.tokens
            s.reserved_cost -= grant.cost
            s.active = max(0, s.active - 1)
        return s

    def release(self, grant: Grant, now: float) -> None:
        """A task that never ran gives its reservation and its turn back."""
        s = self._unreserve(grant)
        if s is None:
            return
        s.turns = max(0, s.turns - 1)
        self._touch(s, s.last_used_ms)

    def delete(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def evict_expired(self, now: float) -> list[str]:
        """Sessions past their TTL and idle; O(expired log n), not a scan of all sessions."""
        gone = []
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, sid = heapq.heappop(heap)
            s = self.sessions.get(sid)
            if s is not None and s.expires_ms() <= now and s.active == 0:
                del self.sessions[sid]
                gone.append(sid)
            # else: gone already, or touched since (a later entry exists), or still busy
            # (its end touches it again)
        return gone

    def view(self, s: Session, now: float, kv_warm: bool) -> dict[str, object]:
        """SessionInfo; an unlimited budget is omitted (the contract has no nulls)."""
        out: dict[str, object] = {
            "session_id": s.id,
            "ttl_ms_remaining": max(0, int(s.expires_ms() - now)),
            "turns": s.turns,
            "max_turns": self.max_turns,
            "kv_bytes": s.kv_bytes,
            "kv_warmth": kv_warm,
        }
        tokens, cost = s.tokens_available(), s.cost_available()
        if tokens is not None:
            out["tokens_budget_remaining"] = tokens
        if s.time_left_ms is not None:
            out["time_budget_remaining_ms"] = int(s.time_left_ms)
        if cost is not None:
            out["cost_budget_remaining"] = cost
        return out
