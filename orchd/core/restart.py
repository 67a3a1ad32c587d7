"""When to restart something that died: exponential backoff plus a circuit breaker.

The one restart rule of orchd: supervisors use it for their engines, the launcher for its
children (:class:`RestartGroup`, which adds that nothing starts while the scheduler is down).
Pure: times are passed in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

# Circuit breaker: after this many consecutive failed starts (or deaths soon after a start)
# stop retrying for a cool-down, then allow one try at a time.
BREAKER_THRESHOLD = 5
BREAKER_COOLDOWN_S = 30.0
# An engine that served this long before dying counts as healthy: restart it at once.
STABLE_AFTER_S = 10.0


class RestartPolicy:
    """Exponential backoff between engine starts, with a circuit breaker.

    Times are passed in (seconds on any monotonic clock). A failure is a start that raised,
    or an engine that died less than ``stable_after_s`` after it became ready; a death after
    a stable run restarts at once. After ``threshold`` consecutive failures the breaker opens:
    the next try waits ``cooldown_s``; one more failure opens it again.
    """

    def __init__(
        self,
        base_s: float,
        cap_s: float,
        threshold: int = BREAKER_THRESHOLD,
        cooldown_s: float = BREAKER_COOLDOWN_S,
        stable_after_s: float = STABLE_AFTER_S,
    ) -> None:
        self.base_s = base_s
        self.cap_s = cap_s
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self.stable_after_s = stable_after_s
        self.failures = 0
        self.ready_at: float | None = None

    @property
    def open(self) -> bool:
        return self.failures >= self.threshold

    def delay(self) -> float:
        """Seconds to wait before the next start."""
        if self.failures == 0:
            return 0.0
        if self.open:
            return self.cooldown_s
        return min(self.cap_s, self.base_s * 2.0 ** (self.failures - 1))

    def start_failed(self) -> None:
        self.failures += 1
        self.ready_at = None

    def ready(self, now: float) -> None:
        self.ready_at = now

    def died(self, now: float) -> None:
        if self.ready_at is not None and now - self.ready_at >= self.stable_after_s:
            self.failures = 0
        else:
            self.failures += 1
        self.ready_at = None


@dataclass
class Child:
    """One child of a :class:`RestartGroup`: its own policy, and when it is due to (re)start."""

    policy: RestartPolicy
    running: bool = False
    restart_at: float | None = None  # set while it waits to be started


class RestartGroup:
    """The launcher's children, each restarted by its own :class:`RestartPolicy`.

    The leader (the scheduler) starts first and no child starts while it is down. Its death
    stops nobody: a restarted scheduler rebuilds its state from its journal and from what the
    others re-announce (orchd/core/recovery.py), so they keep running, and streaming. Pure, like the policy: the launcher does the starting and stopping and
    passes the times in. A new group has every child due at ``now``.
    """

    def __init__(
        self,
        names: Sequence[str],
        leader: str,
        make_policy: Callable[[], RestartPolicy],
        now: float,
    ) -> None:
        if leader not in names:
            raise ValueError(f"the leader {leader!r} is not one of {list(names)}")
        self.leader = leader
        order = [leader] + [n for n in names if n != leader]
        self.children = {n: Child(make_policy(), restart_at=now) for n in order}

    def started(self, name: str, now: float) -> None:
        c = self.children[name]
        c.running, c.restart_at = True, None
        c.policy.ready(now)

    def start_failed(self, name: str, now: float) -> None:
        c = self.children[name]
        c.policy.start_failed()
        c.restart_at = now + c.policy.delay()

    def exited(self, name: str, now: float) -> list[str]:
        """``name`` died at ``now``; returns the running children to stop with it: none (even
        the leader's death leaves the others running)."""
        c = self.children[name]
        c.running = False
        c.policy.died(now)
        c.restart_at = now + c.policy.delay()
        return []

    def due(self, now: float) -> list[str]:
        """The children to start now, in order: the leader first, none while it is down."""
        leader_up = self.children[self.leader].running
        out = []
        for name, c in self.children.items():
            if c.running or c.restart_at is None or c.restart_at > now:
                continue
            if name == self.leader or leader_up:
                out.append(name)
                leader_up = True
        return out

    def next_due(self) -> float | None:
        """When :meth:`due` next has something to start (None: every child is running)."""
        lead = self.children[self.leader]
        if not lead.running:
            return lead.restart_at
        waiting = [c.restart_at for c in self.children.values() if c.restart_at is not None]
        return min(waiting, default=None)
