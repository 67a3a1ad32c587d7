"""The admission queue: bounded, two priorities, FIFO per API key within a priority, weighted
fair across keys, O(1) push and remove.

Fairness is start-time fair queueing per priority lane: each key has a virtual clock that
advances by ``1 / weight`` per task served, and the next task comes from the key with the
smallest clock (ties: the older head). A key that was idle re-enters at the lane's current
minimum, so idling earns no credit. A flood from one key therefore waits behind everybody
else's share instead of in front of it.

Full-queue policies, picked by name from ``QUEUE_POLICIES``:
- ``reject``: the newcomer is refused (``ADMISSION_REJECT``);
- ``drop-lru``: the oldest batch task (else, for an interactive newcomer, the oldest interactive
  one) is dropped to make room (its stream ends with ``QUEUE_FULL_DROP_LRU``); a batch newcomer
  facing a queue of interactive tasks only is refused.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

PRIORITIES = ("interactive", "batch")
T = TypeVar("T")


class QueueFull(Exception):
    """The queue is full and its policy refuses the newcomer."""


@dataclass(slots=True)
class Pushed:
    position: int  # 1-based estimated place in dispatch order at the time of the push
    dropped: str | None  # task id removed to make room (drop-lru), if any


@dataclass(slots=True)
class _Entry(Generic[T]):
    key: str
    seq: int
    item: T


@dataclass(slots=True)
class _Lane(Generic[T]):
    by_key: dict[str, OrderedDict[str, _Entry[T]]] = field(default_factory=dict)
    clock: dict[str, float] = field(default_factory=dict)  # virtual start time per key
    vtime: float = 0.0  # the lane's virtual time: the clock of the last task served
    order: OrderedDict[str, None] = field(default_factory=OrderedDict)  # arrival order (LRU)

    def __len__(self) -> int:
        return len(self.order)


class AdmissionQueue(Generic[T]):
    def __init__(
        self,
        capacity: int,
        policy: str = "reject",
        weights: dict[str, float] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if policy not in QUEUE_POLICIES:
            raise ValueError(f"unknown queue policy {policy!r}; known: {sorted(QUEUE_POLICIES)}")
        self.capacity = capacity
        self.policy = policy
        self.weights = dict(weights or {})
        self._lanes: dict[str, _Lane[T]] = {p: _Lane() for p in PRIORITIES}
        self._where: dict[str, tuple[str, str]] = {}  # task id -> (priority, key)
        self._seq = itertools.count()

    def weight(self, key: str) -> float:
        return max(1e-6, self.weights.get(key, 1.0))

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._where

    def depth(self, priority: str) -> int:
        return len(self._lanes[priority])

    def push(self, task_id: str, priority: str, item: T, key: str = "") -> Pushed:
        if priority not in self._lanes:
            raise ValueError(f"unknown priority {priority!r}")
        if task_id in self._where:
            raise ValueError(f"task {task_id} is already queued")
        dropped = None
        if len(self) >= self.capacity:
            dropped = QUEUE_POLICIES[self.policy](self, priority)
            if dropped is None:
                raise QueueFull()
            self.remove(dropped)
        lane = self._lanes[priority]
        q = lane.by_key.get(key)
        if q is None:
            q = lane.by_key[key] = OrderedDict()
            floor = min((lane.clock[k] for k in lane.by_key if k != key), default=lane.vtime)
            lane.clock[key] = max(lane.clock.get(key, 0.0), floor)
        q[task_id] = _Entry(key, next(self._seq), item)
        lane.order[task_id] = None
        self._where[task_id] = (priority, key)
        return Pushed(self._estimate_position(priority, key, len(q) - 1), dropped)

    def _estimate_position(self, priority: str, key: str, index: int) -> int:
        """Tasks ahead under fair sharing: all of higher lanes, plus each other key's share."""
        ahead = 0
        for p in PRIORITIES:
            if p == priority:
                break
            ahead += len(self._lanes[p])
        lane = self._lanes[priority]
        w = self.weight(key)
        for k, q in lane.by_key.items():
            if k == key:
                ahead += index
            else:
                ahead += min(len(q), math.ceil((index + 1) * self.weight(k) / w))
        return ahead + 1

    def position(self, task_id: str) -> int | None:
        """Where a queued task stands now (1: next), as its admission estimated it."""
        where = self._where.get(task_id)
        if where is None:
            return None
        priority, key = where
        index = list(self._lanes[priority].by_key[key]).index(task_id)
        return self._estimate_position(priority, key, index)

    def remove(self, task_id: str) -> T | None:
        where = self._where.pop(task_id, None)
        if where is None:
            return None
        priority, key = where
        lane = self._lanes[priority]
        del lane.order[task_id]
        q = lane.by_key[key]
        entry = q.pop(task_id)
        if not q:
            del lane.by_key[key]
        return entry.item

    def _candidates(self, lane: _Lane[T]) -> list[tuple[float, int, str, str]]:
        out = []
        for key, q in lane.by_key.items():
            task_id, entry = next(iter(q.items()))
            out.append((lane.clock[key], entry.seq, key, task_id))
        out.sort()
        return out

    def pop_first(self, fits: Callable[[str, T], bool] | None = None) -> tuple[str, T] | None:
        """The next task in fair order (priority first) whose head ``fits``; removed."""
        for p in PRIORITIES:
            lane = self._lanes[p]
            if not lane.order:
                continue
            for _, _, key, task_id in self._candidates(lane):
                item = lane.by_key[key][task_id].item
                if fits is None or fits(task_id, item):
                    lane.vtime = max(lane.vtime, lane.clock[key])
                    lane.clock[key] += 1.0 / self.weight(key)
                    self.remove(task_id)
                    return task_id, item
        return None

    def pop(self) -> tuple[str, T] | None:
        return self.pop_first(None)

    def peek(self) -> tuple[str, T] | None:
        for p in PRIORITIES:
            lane = self._lanes[p]
            if lane.order:
                _, _, key, task_id = self._candidates(lane)[0]
                return task_id, lane.by_key[key][task_id].item
        return None

    def oldest(self, priority: str) -> str | None:
        order = self._lanes[priority].order
        return next(iter(order)) if order else None

    def __iter__(self) -> Iterator[str]:
        for p in PRIORITIES:
            yield from list(self._lanes[p].order)


def _reject(q: AdmissionQueue[T], priority: str) -> str | None:
    return None


def _drop_lru(q: AdmissionQueue[T], priority: str) -> str | None:
    victim = q.oldest("batch")
    if victim is None and priority == "interactive":
        victim = q.oldest("interactive")
    return victim


# Keyed by the names orchd.config.QueuePolicy accepts (tests/unit/test_config_tables.py).
QUEUE_POLICIES: dict[str, Callable[[AdmissionQueue[T], str], str | None]] = {
    "reject": _reject,
    "drop-lru": _drop_lru,
}
