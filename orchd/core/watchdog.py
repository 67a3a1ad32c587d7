"""The launcher's watchdog: which child is alive but has gone silent, and must be killed.

A process can be alive and useless (stopped with SIGSTOP, swapped out, deadlocked): waiting
for it to exit waits forever. Every child must be heard within ``limit_s``:
- the leader (the scheduler) is heard directly: its ``PeersSeen`` reports, one per heartbeat,
  on the launcher's own ZeroMQ link;
- every other child is heard through the leader: a report says how long ago the leader last
  heard each peer, in the leader's waking time. Those children are judged as of the latest
  report, so a silent leader makes nobody else look silent: it is the one killed.

A child is judged from its start: one that never says a word is as silent as one that stopped.
Pure: the launcher passes the times in (seconds on a monotonic clock) and does the killing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Overdue:
    name: str
    silent_s: float

    @property
    def reason(self) -> str:
        return f"watchdog: alive but no heartbeat for {self.silent_s:.1f}s"


class Watchdog:
    def __init__(self, leader: str, limit_s: float, heartbeat_s: float) -> None:
        if limit_s <= 2 * heartbeat_s:
            raise ValueError(
                f"the watchdog limit ({limit_s * 1000:.0f} ms) must exceed two heartbeats "
                f"({2 * heartbeat_s * 1000:.0f} ms): server.watchdog_ms > 2 * server.heartbeat_ms"
            )
        self.leader = leader
        self.limit_s = limit_s
        self.heard: dict[str, float] = {}  # running child -> last heard (launcher's clock)
        self.report_at: float | None = None  # the leader's latest report

    def started(self, name: str, now: float) -> None:
        """A child (re)started: it has a full limit to be heard."""
        self.heard[name] = now

    def exited(self, name: str) -> None:
        self.heard.pop(name, None)

    def report(self, ages_ms: Mapping[str, int], now: float) -> None:
        """The leader's report: it runs, and heard each peer ``ages_ms[peer]`` ago."""
        if self.leader in self.heard:
            self.heard[self.leader] = now
        self.report_at = now
        for name, age in ages_ms.items():
            last = self.heard.get(name)
            if last is not None and name != self.leader:
                self.heard[name] = max(last, now - age / 1000.0)

    def overdue(self, now: float) -> list[Overdue]:
        """Running children silent past the limit (the leader first)."""
        out = []
        lead = self.heard.get(self.leader)
        if lead is not None and now - lead > self.limit_s:
            out.append(Overdue(self.leader, now - lead))
            return out  # the others are judged by the leader's word: none is trusted now
        at = self.report_at
        if at is None:
            return out
        for name, last in self.heard.items():
            if name != self.leader and at - last > self.limit_s:
                out.append(Overdue(name, at - last))
        return out
