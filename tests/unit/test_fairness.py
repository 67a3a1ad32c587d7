"""Weighted fairness across API keys in the admission queue (orchd/core/queue.py)."""

from __future__ import annotations

from collections import Counter

from ipc import protocol as p
from orchd.core.placement import ReplicaView
from orchd.core.queue import AdmissionQueue
from orchd.core.scheduler import SchedulerCore
from orchd.core.sessions import SessionTable


def drain(q: AdmissionQueue, n: int | None = None) -> list[str]:
    out = []
    while n is None or len(out) < n:
        got = q.pop()
        if got is None:
            break
        out.append(got[0])
    return out


def key_of(tid: str) -> str:
    return tid.split("-")[0]


def test_a_flood_does_not_starve_a_later_key() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(1000)
    for i in range(100):
        q.push(f"a-{i}", "batch", None, key="a")
    for i in range(10):
        q.push(f"b-{i}", "batch", None, key="b")
    first = drain(q, 20)
    assert sorted(t for t in first if key_of(t) == "b") == sorted(f"b-{i}" for i in range(10))
    # Strictly interleaved while both keys have work: a (older head) then b.
    assert [key_of(t) for t in first] == ["a", "b"] * 10
    # Each key's own tasks stay FIFO.
    assert [t for t in first if key_of(t) == "a"] == [f"a-{i}" for i in range(10)]
    assert [t for t in first if key_of(t) == "b"] == [f"b-{i}" for i in range(10)]
    rest = drain(q)
    assert rest == [f"a-{i}" for i in range(10, 100)]


def test_a_key_arriving_mid_flood_is_served_at_once() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(1000)
    for i in range(100):
        q.push(f"a-{i}", "interactive", None, key="a")
    drain(q, 50)  # a alone has been served 50 times
    q.push("b-0", "interactive", None, key="b")
    nxt = drain(q, 2)
    assert "b-0" in nxt, nxt


def test_weights_give_proportional_service() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(1000, weights={"a": 3.0, "b": 1.0})
    for i in range(200):
        q.push(f"a-{i}", "batch", None, key="a")
        q.push(f"b-{i}", "batch", None, key="b")
    served = Counter(key_of(t) for t in drain(q, 80))
    assert served["a"] + served["b"] == 80
    assert 58 <= served["a"] <= 62, served
    # And in every window of 8, a gets about 6.
    q2: AdmissionQueue[None] = AdmissionQueue(1000, weights={"a": 3.0})
    for i in range(100):
        q2.push(f"a-{i}", "batch", None, key="a")
        q2.push(f"b-{i}", "batch", None, key="b")
    order = [key_of(t) for t in drain(q2, 40)]
    for w in range(0, 40, 8):
        assert 5 <= order[w : w + 8].count("a") <= 7, order


def test_an_idle_key_earns_no_credit() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(1000)
    q.push("b-0", "batch", None, key="b")
    assert drain(q) == ["b-0"]  # b served once, then idle
    for i in range(60):
        q.push(f"a-{i}", "batch", None, key="a")
    drain(q, 40)  # a alone, 40 times
    for i in range(1, 11):
        q.push(f"b-{i}", "batch", None, key="b")
    # b re-enters at a's clock: it shares, it does not get 39 turns in a row.
    order = [key_of(t) for t in drain(q, 10)]
    assert order.count("b") <= 6, order
    assert order.count("a") >= 4, order


def test_a_key_that_ran_alone_is_not_starved_later() -> None:
    """Using spare capacity while nobody else waits must not be held against a key later.

    Key a runs 100 tasks alone (its virtual clock reaches 100) and the queue empties. Then b
    pushes 50 tasks, and a pushes one: a's task must be served about as soon as b's second,
    not after all of b's. Today b re-enters at floor 0 (no key is queued when it arrives)
    while a keeps its clock of 100, so a waits behind every one of b's 50 tasks: the longer a
    key once ran alone, the longer it is starved afterwards."""
    q: AdmissionQueue[None] = AdmissionQueue(1000)
    for i in range(100):
        q.push(f"a-{i}", "batch", None, key="a")
    assert len(drain(q)) == 100
    for i in range(50):
        q.push(f"b-{i}", "batch", None, key="b")
    q.push("a-100", "batch", None, key="a")
    order = drain(q)
    assert order.index("a-100") <= 2, f"a served at pop {order.index('a-100') + 1} of {len(order)}"


def test_a_key_returning_to_an_empty_lane_shares_with_the_next_one() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(100)
    for i in range(5):
        q.push(f"a-{i}", "batch", None, key="a")
    drain(q)
    for i in range(5, 10):
        q.push(f"a-{i}", "batch", None, key="a")
    for i in range(5):
        q.push(f"b-{i}", "batch", None, key="b")
    # b arrives while a is queued: it starts at a's clock, so they alternate.
    assert [key_of(t) for t in drain(q)] == ["a", "b"] * 5


def test_priorities_dominate_fairness() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(100, weights={"heavy": 100.0})
    for i in range(5):
        q.push(f"heavy-{i}", "batch", None, key="heavy")
    q.push("light-0", "interactive", None, key="light")
    for i in range(5, 8):
        q.push(f"heavy-{i}", "interactive", None, key="heavy")
    order = drain(q)
    lanes = [
        "interactive" if t in ("light-0", "heavy-5", "heavy-6", "heavy-7") else "batch"
        for t in order
    ]
    assert lanes == ["interactive"] * 4 + ["batch"] * 5
    assert order[4:] == [f"heavy-{i}" for i in range(5)]


def test_pop_first_looks_past_a_head_that_does_not_fit() -> None:
    """Issue 12: a task that cannot be placed blocks no task that can, not even its own key's
    (with one default key, one task for a broken model used to stop all traffic)."""
    q: AdmissionQueue[str] = AdmissionQueue(100)
    q.push("a-0", "interactive", "big", key="a")
    q.push("a-1", "interactive", "small", key="a")
    q.push("b-0", "interactive", "small", key="b")

    def small(_: str, item: str) -> bool:
        return item == "small"

    # a's clock is as low as b's and its head is older: a goes first, with its first task
    # that fits; then b (a's clock moved on); then nothing fits.
    assert q.pop_first(small) == ("a-1", "small")
    assert q.pop_first(small) == ("b-0", "small")
    assert q.pop_first(small) is None
    assert "a-0" in q
    assert q.pop_first() == ("a-0", "big")
    assert len(q) == 0


def test_fitting_tasks_of_one_key_keep_their_order_past_a_misfit() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(100)
    for i, size in enumerate(["big", "small", "big", "small", "small"]):
        q.push(f"k-{i}", "interactive", size)
    took = []
    while (got := q.pop_first(lambda _, item: item == "small")) is not None:
        took.append(got[0])
    assert took == ["k-1", "k-3", "k-4"]
    assert list(q) == ["k-0", "k-2"]


def test_pop_first_falls_through_to_a_lower_priority() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(100)
    q.push("i-0", "interactive", "big", key="i")
    q.push("b-0", "batch", "small", key="b")
    assert q.pop_first(lambda _, item: item == "small") == ("b-0", "small")
    assert q.pop() == ("i-0", "big")


def test_skipping_a_key_does_not_charge_its_clock() -> None:
    q: AdmissionQueue[str] = AdmissionQueue(100)
    for i in range(3):
        q.push(f"a-{i}", "batch", "x", key="a")
        q.push(f"b-{i}", "batch", "x", key="b")

    def not_a(tid: str, _: str) -> bool:
        return key_of(tid) != "a"

    assert [q.pop_first(not_a)[0] for _ in range(3)] == ["b-0", "b-1", "b-2"]  # type: ignore[index]
    # a was skipped, never served: its tasks are now next.
    assert drain(q) == ["a-0", "a-1", "a-2"]


def test_positions_reflect_fair_share() -> None:
    q: AdmissionQueue[None] = AdmissionQueue(1000)
    for i in range(50):
        q.push(f"a-{i}", "batch", None, key="a")
    # b's first task is not behind a's 50: it gets about every other slot.
    assert q.push("b-0", "batch", None, key="b").position == 2
    assert q.push("b-1", "batch", None, key="b").position == 4


def test_scheduler_serves_a_second_key_amid_a_flood() -> None:
    """The same fairness through the scheduler core: one slot, key a floods, key b arrives."""
    core = SchedulerCore(
        [ReplicaView("r0", "default", "mock", 1)],
        queue_capacity=200,
        sessions=SessionTable(max_turns=1000),
    )
    core.replica_status("sup-r0", p.ReplicaStatus("r0", True, "mock", "v"), 1)

    def submit(tid: str, key: str, now: float) -> list:
        s = p.TaskSpec(
            tid, f"s-{key}", "completion", "mock:tiny", "mock", 64, "batch", 8, 10**6, key
        )
        return core.submit("fe0", p.Submit(0, s), now)

    for i in range(50):
        submit(f"a-{i}", "a", 10 + i)
    admitted = [
        m for _, m in submit("b-0", "b", 100) + submit("b-1", "b", 101) if isinstance(m, p.Admitted)
    ]
    assert [m.queue_position for m in admitted] == [2, 4]
    order = []
    running = "a-0"
    for step in range(6):
        out = core.task_ended("sup-r0", p.TaskEnded(running, "stop", 1), 200 + step)
        ((_, d),) = [(peer, m) for peer, m in out if isinstance(m, p.Dispatch)]
        running = d.task.task_id
        order.append(running)
    assert order[:4] == ["a-1", "b-0", "a-2", "b-1"]
