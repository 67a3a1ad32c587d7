"""Sessions and their budgets (orchd/core/sessions.py), with time passed in."""

from __future__ import annotations

import pytest

from orchd.core.errors import Code, OrchdError
from orchd.core.sessions import Grant, Limits, SessionTable

TTL = 1000


def table(**kw) -> SessionTable:
    kw.setdefault("ttl_ms", TTL)
    return SessionTable(**kw)


def refused(fn, *args) -> OrchdError:
    with pytest.raises(OrchdError) as ei:
        fn(*args)
    return ei.value


def settle(t: SessionTable, g: Grant, now: float, **kw) -> None:
    args = {
        "tokens_in": 0,
        "tokens_out": 0,
        "decode_ms": 0.0,
        "replica": "",
        "kv_bytes_per_token": 0,
    }
    args.update(kw)
    t.settle(g, now=now, **args)


# ---------------------------------------------------------------- creation and limits


def test_first_admit_creates_the_session_with_default_limits() -> None:
    t = table(default=Limits(tokens=100, time_ms=5000.0, cost=2.0))
    assert t.get("s1", 0) is None
    g = t.admit("s1", "k1", 10, 50)
    assert g == Grant("s1", 10, 0.0)
    s = t.get("s1", 50)
    assert s is not None
    assert (s.id, s.owner, s.created_ms, s.last_used_ms, s.ttl_ms) == ("s1", "k1", 50, 50, TTL)
    assert (s.tokens_left, s.time_left_ms, s.cost_left) == (100, 5000.0, 2.0)
    assert (s.turns, s.active, s.reserved_tokens) == (1, 1, 10)
    assert s.tokens_available() == 90


def test_per_key_limits_override_the_default() -> None:
    t = table(
        default=Limits(tokens=100),
        per_key={"vip": Limits(tokens=1000, time_ms=None, cost=None)},
    )
    t.admit("a", "vip", 1, 0)
    t.admit("b", "other", 1, 0)
    assert t.sessions["a"].tokens_left == 1000
    assert t.sessions["b"].tokens_left == 100
    assert t.limits_for("vip").tokens == 1000
    assert t.limits_for("nobody") is t.default


def test_unlimited_by_default() -> None:
    t = table()
    t.admit("s", "k", 10**9, 0)
    s = t.sessions["s"]
    assert (s.tokens_left, s.time_left_ms, s.cost_left) == (None, None, None)
    assert s.tokens_available() is None
    assert s.cost_available() is None


def test_default_table_values() -> None:
    t = SessionTable()
    assert (t.ttl_ms, t.max_turns) == (600_000, 8)


# ---------------------------------------------------------------- TTL


def test_ttl_expiry_after_last_use() -> None:
    t = table()
    g = t.admit("s", "k", 1, 100)
    settle(t, g, 200)
    assert t.sessions["s"].expires_ms() == 200 + TTL
    assert t.get("s", 200 + TTL - 1) is not None
    assert t.get("s", 200 + TTL) is None
    assert "s" not in t.sessions


def test_each_use_extends_the_ttl() -> None:
    t = table()
    g = t.admit("s", "k", 1, 0)
    settle(t, g, 10)
    g = t.admit("s", "k", 1, 900)  # still alive at 900: used again
    settle(t, g, 950)
    assert t.get("s", 1500) is not None  # would have expired at 1010 without the second use
    assert t.get("s", 950 + TTL) is None


def test_evict_expired() -> None:
    t = table()
    settle(t, t.admit("old", "k", 1, 0), 0)
    settle(t, t.admit("new", "k", 1, 500), 500)
    assert t.evict_expired(TTL - 1) == []
    assert t.evict_expired(TTL) == ["old"]
    assert set(t.sessions) == {"new"}
    assert t.evict_expired(500 + TTL) == ["new"]
    assert t.sessions == {}


def test_never_expires_while_a_task_is_active() -> None:
    t = table()
    g = t.admit("s", "k", 1, 0)  # admitted, never settled: active
    far = 100 * TTL
    assert t.evict_expired(far) == []
    assert t.get("s", far) is not None
    settle(t, g, far)
    assert t.get("s", far + TTL - 1) is not None
    assert t.evict_expired(far + TTL) == ["s"]


def test_an_expired_session_id_starts_afresh() -> None:
    t = table(default=Limits(tokens=100))
    settle(t, t.admit("s", "k", 10, 0), 0, tokens_out=10)
    assert t.sessions["s"].tokens_left == 90
    t.admit("s", "k", 10, 5 * TTL)
    s = t.sessions["s"]
    assert (s.turns, s.tokens_left, s.created_ms) == (1, 100, 5 * TTL)


# ---------------------------------------------------------------- turns


def test_max_turns_refusal_names_session_id() -> None:
    t = table(max_turns=3)
    for i in range(3):
        settle(t, t.admit("s", "k", 1, i), i)
    e = refused(t.admit, "s", "k", 1, 10)
    assert e.code is Code.INVALID_PARAMS
    assert e.message.startswith("session_id:")
    assert "s" in e.message and "3 turns" in e.message
    s = t.sessions["s"]
    assert (s.turns, s.active, s.reserved_tokens) == (3, 0, 0)


def test_concurrent_tasks_count_as_turns() -> None:
    t = table(max_turns=2)
    t.admit("s", "k", 1, 0)
    t.admit("s", "k", 1, 0)
    assert refused(t.admit, "s", "k", 1, 0).code is Code.INVALID_PARAMS


# ---------------------------------------------------------------- token budget


def test_token_budget_refusal() -> None:
    t = table(default=Limits(tokens=100))
    e = refused(t.admit, "s", "k", 101, 0)
    assert e.code is Code.BUDGET_EXHAUSTED
    assert e.policy_label == "budget:tokens"
    assert e.status == 429
    assert "101" in e.message and "100" in e.message
    # Exactly what is left is fine: never silently truncated, never refused at the edge.
    t.admit("s2", "k", 100, 0)


def test_token_budget_counts_reservations_of_concurrent_tasks() -> None:
    t = table(default=Limits(tokens=100))
    t.admit("s", "k", 60, 0)
    s = t.sessions["s"]
    assert s.tokens_available() == 40
    e = refused(t.admit, "s", "k", 41, 1)
    assert e.code is Code.BUDGET_EXHAUSTED and e.policy_label == "budget:tokens"
    assert "40" in e.message
    t.admit("s", "k", 40, 2)
    assert s.tokens_available() == 0
    assert refused(t.admit, "s", "k", 1, 3).code is Code.BUDGET_EXHAUSTED
    assert (s.turns, s.active, s.reserved_tokens) == (2, 2, 100)


def test_token_budget_after_spending() -> None:
    t = table(default=Limits(tokens=100))
    g = t.admit("s", "k", 80, 0)
    settle(t, g, 10, tokens_out=70)
    s = t.sessions["s"]
    assert (s.tokens_left, s.reserved_tokens, s.tokens_available()) == (30, 0, 30)
    assert refused(t.admit, "s", "k", 31, 11).code is Code.BUDGET_EXHAUSTED
    t.admit("s", "k", 30, 12)


# ---------------------------------------------------------------- cost budget


def test_cost_budget_uses_cost_per_token() -> None:
    t = table(cost_per_token=0.01, default=Limits(cost=1.0))
    g = t.admit("s", "k", 60, 0)
    assert g.cost == pytest.approx(0.6)
    s = t.sessions["s"]
    assert s.cost_available() == pytest.approx(0.4)
    e = refused(t.admit, "s", "k", 41, 1)
    assert e.code is Code.BUDGET_EXHAUSTED
    assert e.policy_label == "budget:cost"
    # What is left exactly (up to float rounding) fits.
    t.admit("s", "k", 40, 2)
    assert s.cost_available() == pytest.approx(0.0)


def test_cost_charged_on_actual_tokens() -> None:
    t = table(cost_per_token=0.5, default=Limits(cost=10.0))
    g = t.admit("s", "k", 10, 0)
    settle(t, g, 1, tokens_out=4)
    s = t.sessions["s"]
    assert s.cost_left == pytest.approx(8.0)
    assert s.reserved_cost == pytest.approx(0.0)
    assert s.cost_available() == pytest.approx(8.0)


# ---------------------------------------------------------------- time budget


def test_time_budget_spent_refuses() -> None:
    t = table(default=Limits(time_ms=100.0))
    g = t.admit("s", "k", 1, 0)
    settle(t, g, 50, decode_ms=60.0)
    assert t.sessions["s"].time_left_ms == 40.0
    g = t.admit("s", "k", 1, 60)  # some time left: admitted
    settle(t, g, 120, decode_ms=50.0)
    assert t.sessions["s"].time_left_ms == -10.0
    e = refused(t.admit, "s", "k", 1, 130)
    assert e.code is Code.BUDGET_EXHAUSTED
    assert e.policy_label == "budget:time"
    assert t.sessions["s"].turns == 2


# ---------------------------------------------------------------- settle and release


def test_settle_charges_actual_use() -> None:
    t = table(cost_per_token=0.1, default=Limits(tokens=1000, time_ms=10_000.0, cost=100.0))
    g = t.admit("s", "k", 50, 0)
    settle(
        t,
        g,
        300,
        tokens_in=7,
        tokens_out=20,
        decode_ms=250.0,
        replica="r3",
        kv_bytes_per_token=16,
    )
    s = t.sessions["s"]
    assert s.tokens_left == 1000 - 7 - 20  # the prompt is charged as the answer is
    assert s.time_left_ms == 9750.0
    assert s.cost_left == pytest.approx(100.0 - 2.7)
    assert (s.reserved_tokens, s.reserved_cost) == (0, pytest.approx(0.0))
    assert s.kv_bytes == (7 + 20) * 16
    assert s.last_replica == "r3"
    assert s.last_used_ms == 300
    assert (s.turns, s.active) == (1, 0)  # a settled task keeps its turn
    # kv bytes accumulate; an empty replica leaves the last one in place.
    settle(t, t.admit("s", "k", 1, 400), 500, tokens_in=1, tokens_out=1, kv_bytes_per_token=16)
    assert s.kv_bytes == 29 * 16
    assert s.last_replica == "r3"


def test_release_gives_back_reservation_and_turn() -> None:
    t = table(max_turns=1, cost_per_token=1.0, default=Limits(tokens=10, cost=10.0))
    g = t.admit("s", "k", 10, 0)
    s = t.sessions["s"]
    assert (s.turns, s.active, s.reserved_tokens, s.tokens_available()) == (1, 1, 10, 0)
    t.release(g, 5)
    assert (s.turns, s.active, s.reserved_tokens, s.reserved_cost) == (0, 0, 0, 0.0)
    assert (s.tokens_left, s.cost_left) == (10, 10.0)  # nothing charged
    # The turn and the budget are usable again.
    t.admit("s", "k", 10, 6)


def test_settle_and_release_of_a_forgotten_session_do_nothing() -> None:
    t = table()
    g = t.admit("s", "k", 1, 0)
    assert t.delete("s")
    settle(t, g, 1, tokens_out=1)
    t.release(g, 1)
    assert t.sessions == {}
    assert not t.delete("s")


# ---------------------------------------------------------------- ownership and view


def test_another_keys_session_is_forbidden() -> None:
    t = table(default=Limits(tokens=100))
    t.admit("s", "alice", 10, 0)
    e = refused(t.admit, "s", "bob", 10, 1)
    assert e.code is Code.FORBIDDEN
    assert "another API key" in e.message
    s = t.sessions["s"]
    assert (s.owner, s.turns, s.reserved_tokens) == ("alice", 1, 10)


def test_view_fields() -> None:
    t = table(
        max_turns=5, cost_per_token=0.5, default=Limits(tokens=100, time_ms=2000.0, cost=50.0)
    )
    g = t.admit("s", "k", 10, 0)
    settle(t, g, 100, tokens_in=2, tokens_out=8, decode_ms=80.5, replica="r0", kv_bytes_per_token=4)
    t.admit("s", "k", 20, 200)  # in flight: reserved
    s = t.sessions["s"]
    v = t.view(s, 700, kv_warm=True)
    assert v == {
        "session_id": "s",
        "ttl_ms_remaining": 200 + TTL - 700,
        "turns": 2,
        "max_turns": 5,
        "kv_bytes": 40,
        "kv_warmth": True,
        "tokens_budget_remaining": 100 - 2 - 8 - 20,
        "time_budget_remaining_ms": 1919,
        "cost_budget_remaining": pytest.approx(50 - 5 - 10),
    }
    # Past its expiry (kept alive by the active task) the TTL left is 0, not negative.
    assert t.view(s, 10 * TTL, kv_warm=False)["ttl_ms_remaining"] == 0
    unl = table()
    unl.admit("u", "k", 1, 0)
    v = unl.view(unl.sessions["u"], 0, kv_warm=False)
    # Unlimited budgets are omitted, never null.
    for k in ("tokens_budget_remaining", "time_budget_remaining_ms", "cost_budget_remaining"):
        assert k not in v
    assert None not in v.values()
    assert v["kv_warmth"] is False
