"""The admission queue (orchd/core/queue.py)."""

from __future__ import annotations

import pytest

from orchd.core.queue import AdmissionQueue, QueueFull


def order(q: AdmissionQueue) -> list[str]:
    return list(q)


def test_fifo_within_priority() -> None:
    q: AdmissionQueue[int] = AdmissionQueue(10)
    for i in range(5):
        q.push(f"t{i}", "batch", i)
    assert order(q) == [f"t{i}" for i in range(5)]
    assert [q.pop() for _ in range(5)] == [(f"t{i}", i) for i in range(5)]
    assert q.pop() is None
    assert q.peek() is None
    assert len(q) == 0


def test_interactive_before_batch() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(10)
    q.push("b1", "batch", "B1")
    q.push("i1", "interactive", "I1")
    q.push("b2", "batch", "B2")
    q.push("i2", "interactive", "I2")
    assert order(q) == ["i1", "i2", "b1", "b2"]
    assert q.peek() == ("i1", "I1")
    assert q.peek() == ("i1", "I1")  # peek does not consume
    assert [q.pop() for _ in range(4)] == [("i1", "I1"), ("i2", "I2"), ("b1", "B1"), ("b2", "B2")]


def test_push_returns_positions_in_dispatch_order() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(10)
    assert q.push("i1", "interactive", None).position == 1
    assert q.push("b1", "batch", None).position == 2
    assert q.push("b2", "batch", None).position == 3
    # An interactive newcomer goes ahead of every batch task.
    assert q.push("i2", "interactive", None).position == 2
    assert q.push("b3", "batch", None).position == 5
    pushed = q.push("i3", "interactive", None)
    assert pushed.position == 3
    assert pushed.dropped is None


def test_remove_from_middle_keeps_order() -> None:
    q: AdmissionQueue[int] = AdmissionQueue(10)
    for i in range(5):
        q.push(f"t{i}", "interactive", i)
    q.push("b0", "batch", 100)
    assert q.remove("t2") == 2
    assert "t2" not in q
    assert len(q) == 5
    assert order(q) == ["t0", "t1", "t3", "t4", "b0"]
    assert q.remove("t2") is None
    assert q.remove("nope") is None
    assert q.remove("b0") == 100
    assert order(q) == ["t0", "t1", "t3", "t4"]
    # A removed id can be queued again, at the tail.
    assert q.push("t2", "interactive", 2).position == 5
    assert order(q) == ["t0", "t1", "t3", "t4", "t2"]


def test_len_contains_oldest() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(4)
    assert q.oldest("batch") is None
    q.push("b1", "batch", None)
    q.push("i1", "interactive", None)
    q.push("b2", "batch", None)
    assert len(q) == 3
    assert "b1" in q and "i1" in q and "zz" not in q
    assert q.oldest("batch") == "b1"
    assert q.oldest("interactive") == "i1"


def test_reject_policy_raises_queue_full_and_leaves_queue_alone() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(2, "reject")
    q.push("a", "batch", None)
    q.push("b", "interactive", None)
    with pytest.raises(QueueFull):
        q.push("c", "interactive", None)
    with pytest.raises(QueueFull):
        q.push("d", "batch", None)
    assert order(q) == ["b", "a"]
    assert len(q) == 2
    q.pop()
    assert q.push("c", "interactive", None).position == 1


def test_drop_lru_drops_oldest_batch_for_interactive_newcomer() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(3, "drop-lru")
    q.push("b1", "batch", None)
    q.push("i1", "interactive", None)
    q.push("b2", "batch", None)
    pushed = q.push("i2", "interactive", None)
    assert pushed.dropped == "b1"
    assert pushed.position == 2
    assert order(q) == ["i1", "i2", "b2"]
    assert "b1" not in q


def test_drop_lru_drops_oldest_batch_for_batch_newcomer() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(2, "drop-lru")
    q.push("b1", "batch", None)
    q.push("b2", "batch", None)
    pushed = q.push("b3", "batch", None)
    assert pushed.dropped == "b1"
    assert pushed.position == 2
    assert order(q) == ["b2", "b3"]


def test_drop_lru_drops_oldest_interactive_when_no_batch_queued() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(2, "drop-lru")
    q.push("i1", "interactive", None)
    q.push("i2", "interactive", None)
    pushed = q.push("i3", "interactive", None)
    assert pushed.dropped == "i1"
    assert pushed.position == 2
    assert order(q) == ["i2", "i3"]


def test_drop_lru_refuses_batch_newcomer_when_only_interactive_queued() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(2, "drop-lru")
    q.push("i1", "interactive", None)
    q.push("i2", "interactive", None)
    with pytest.raises(QueueFull):
        q.push("b1", "batch", None)
    assert order(q) == ["i1", "i2"]


def test_unknown_policy_and_priority_raise() -> None:
    with pytest.raises(ValueError, match="unknown queue policy 'lifo'"):
        AdmissionQueue(4, "lifo")
    q: AdmissionQueue[None] = AdmissionQueue(4)
    with pytest.raises(ValueError, match="unknown priority 'urgent'"):
        q.push("t", "urgent", None)
    assert len(q) == 0


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError):
        AdmissionQueue(0)


def test_duplicate_task_id_raises() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(4)
    q.push("t", "batch", None)
    with pytest.raises(ValueError, match="already queued"):
        q.push("t", "batch", None)
    with pytest.raises(ValueError, match="already queued"):
        q.push("t", "interactive", None)
    assert order(q) == ["t"]


def test_duplicate_on_full_drop_lru_queue_drops_nothing() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(2, "drop-lru")
    q.push("b1", "batch", None)
    q.push("b2", "batch", None)
    with pytest.raises(ValueError):
        q.push("b2", "batch", None)
    assert order(q) == ["b1", "b2"]
