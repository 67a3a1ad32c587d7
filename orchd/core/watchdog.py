"""The launcher's watchdog: which child is alive but has gone silent, and must be killed.

A process can be alive and useless (stopped with SIGSTOP, swapped out, deadlocked): waiting
for it to exit waits forever. Every child must be heard within ``limit_s``:
- the leader (the scheduler) is heard directly: its ``PeersSeen`` reports, one per heartbeat,
  on the launcher's own ZeroMQ link;
- every other child is heard through the leader: a report says how long ago the leader last
  heard each peer, in the leader's waking time. Those children are judged as of the latest
  report, so a silent leader makes nobody else look silent: it is the one killed.

A child is judged from its start, but until it is first heard it has ``START_LIMIT_S`` (or the
limit, if longer): starting Python and importing a web stack takes seconds on a busy host.
One that never says a word is still killed, then.
Pure: the launcher passes the times in (seconds on a monotonic clock) and does the killing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

START_LIMIT_S = 30.0  # a child not heard yet since its start is killed after this long
# The scheduler reports once per heartbeat, but an idle one turns its loop once a second
# (orchd/scheduler/loop.py IDLE_TICK_S): a report may take that long.
REPORT_EVERY_S = 1.0


@dataclass(frozen=True, slots=True)
class Overdue:
    name: str
    silent_s: float

    @property
    def reason(self) -> str:
        return f"watchdog: alive but no heartbeat for {self.silent_s:.1f}s"


class Watchdog:
    def __init__(self, leader: str, limit_s: float, heartbeat_s: float) -> None:
        floor_s = 2 * max(heartbeat_s, REPORT_EVERY_S)
        if limit_s < floor_s:
            raise ValueError(
                f"server.watchdog_ms ({limit_s * 1000:.0f}) must be at least two heartbeats "
                f"and at least 2000: >= {floor_s * 1000:.0f} here"
            )
        self.leader = leader
        self.limit_s = limit_s
        self.start_limit_s = max(limit_s, START_LIMIT_S)
        self.heard: dict[str, float] = {}  # running child -> last heard (launcher's clock)
        self.starting: set[str] = set()  # running, not heard since its start
        self.report_at: float | None = None  # the leader's latest report

    def started(self, name: str, now: float) -> None:
        """A child (re)started: it has the start limit to be heard first."""
        self.heard[name] = now
        self.starting.add(name)

    def exited(self, name: str) -> None:
        self.heard.pop(name, None)
        self.starting.discard(name)

    def report(self, ages_ms: Mapping[str, int], now: float) -> None:
        """The leader's report: it runs, and heard each peer ``ages_ms[peer]`` ago."""
        if self.leader in self.heard:
            self.heard[self.leader] = now
            self.starting.discard(self.leader)
        self.report_at = now
        for name, age in ages_ms.items():
            last = self.heard.get(name)
            if last is not None and name != self.leader and now - age / 1000.0 >= last:
                self.heard[name] = now - age / 1000.0
                self.starting.discard(name)  # heard since its start

    def overdue(self, now: float) -> list[Overdue]:
        """Running children silent past the limit (the leader first)."""
        out = []
        lead = self.heard.get(self.leader)
        if lead is not None and now - lead > self._limit(self.leader):
            out.append(Overdue(self.leader, now - lead))
            return out  # the others are judged by the leader's word: none is trusted now
        at = self.report_at
        if at is None:
            return out
        for name, last in self.heard.items():
            if name != self.leader and at - last > self._limit(name):
                out.append(Overdue(name, at - last))
        return out

    def _limit(self, name: str) -> float:
        return self.start_limit_s if name in self.starting else self.limit_s
