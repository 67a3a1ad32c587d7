"""The admission queue: bounded, two priorities, FIFO within a priority, O(1) push and remove.

Full-queue policies, picked by name:
- ``reject``: the newcomer is refused (``ADMISSION_REJECT``);
- ``drop-lru``: the oldest batch task (else the oldest interactive one) is dropped to make room
  (``QUEUE_FULL_DROP_LRU`` for the dropped task), unless the newcomer is batch and only
  interactive tasks are queued, in which case the newcomer is refused.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

PRIORITIES = ("interactive", "batch")
T = TypeVar("T")


class QueueFull(Exception):
    """The queue is full and its policy refuses the newcomer."""


@dataclass(slots=True)
class Pushed:
    position: int  # 1-based place in dispatch order at the time of the push
    dropped: str | None  # task id removed to make room (drop-lru), if any


class AdmissionQueue(Generic[T]):
    def __init__(self, capacity: int, policy: str = "reject") -> None:
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        if policy not in QUEUE_POLICIES:
            raise ValueError(f"unknown queue policy {policy!r}; known: {sorted(QUEUE_POLICIES)}")
        self.capacity = capacity
        self.policy = policy
        self._lanes: dict[str, OrderedDict[str, T]] = {p: OrderedDict() for p in PRIORITIES}
        self._lane_of: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._lane_of)

    def __contains__(self, task_id: object) -> bool:
        return task_id in self._lane_of

    def push(self, task_id: str, priority: str, item: T) -> Pushed:
        if priority not in self._lanes:
            raise ValueError(f"unknown priority {priority!r}")
        if task_id in self._lane_of:
            raise ValueError(f"task {task_id} is already queued")
        dropped = None
        if len(self) >= self.capacity:
            dropped = QUEUE_POLICIES[self.policy](self, priority)
            if dropped is None:
                raise QueueFull()
            self.remove(dropped)
        self._lanes[priority][task_id] = item
        self._lane_of[task_id] = priority
        return Pushed(self._position_of_tail(priority), dropped)

    def _position_of_tail(self, priority: str) -> int:
        n = 0
        for p in PRIORITIES:
            n += len(self._lanes[p])
            if p == priority:
                return n
        raise AssertionError(priority)

    def remove(self, task_id: str) -> T | None:
        lane = self._lane_of.pop(task_id, None)
        if lane is None:
            return None
        return self._lanes[lane].pop(task_id)

    def peek(self) -> tuple[str, T] | None:
        for p in PRIORITIES:
            lane = self._lanes[p]
            if lane:
                task_id = next(iter(lane))
                return task_id, lane[task_id]
        return None

    def pop(self) -> tuple[str, T] | None:
        for p in PRIORITIES:
            lane = self._lanes[p]
            if lane:
                task_id, item = lane.popitem(last=False)
                del self._lane_of[task_id]
                return task_id, item
        return None

    def oldest(self, priority: str) -> str | None:
        lane = self._lanes[priority]
        return next(iter(lane)) if lane else None

    def __iter__(self) -> Iterator[str]:
        for p in PRIORITIES:
            yield from self._lanes[p]


def _reject(q: AdmissionQueue[T], priority: str) -> str | None:
    return None


def _drop_lru(q: AdmissionQueue[T], priority: str) -> str | None:
    victim = q.oldest("batch")
    if victim is None and priority == "interactive":
        victim = q.oldest("interactive")
    return victim


QUEUE_POLICIES = {"reject": _reject, "drop-lru": _drop_lru}
