"""Who the scheduler still hears from, judged only on time it was awake to hear them.

A peer is silent when nothing came from it for ``timeout_ms`` of the scheduler's own waking
time. The owner calls :meth:`PeerClock.woke` at the top of every loop turn, before it reads
its socket: a gap between turns longer than ``stall_ms`` is time the scheduler itself did not
run (a long GC, swap, SIGSTOP, a debugger), and every peer is credited with it, so a scheduler
resumed after a pause reads the heartbeats queued meanwhile before it judges anyone.

A message from a peer the clock does not know (declared dead earlier, or this scheduler is new
and never met it) makes :meth:`heard` answer ``ASK``, once: the owner replies ``Rehello`` and
the peer's next ``Hello`` takes it back (:meth:`hello`). A ``Hello`` with the pid already known
is the same process re-introducing itself; another pid is a new incarnation.

Pure: times (ms on any monotonic clock) are passed in.
"""

from __future__ import annotations

from enum import Enum


class Heard(Enum):
    KNOWN = "known"  # a peer taken as alive
    ASK = "ask"  # unknown: ask it to introduce itself (Rehello)
    ASKED = "asked"  # unknown, and already asked: wait for its Hello


class PeerClock:
    def __init__(self, timeout_ms: float, stall_ms: float, now: float) -> None:
        if timeout_ms <= 0 or stall_ms <= 0:
            raise ValueError("timeout_ms and stall_ms must be > 0")
        self.timeout_ms = timeout_ms
        self.stall_ms = stall_ms
        self.last: dict[str, float] = {}  # every peer ever heard -> when, in waking time
        self.known: set[str] = set()  # peers taken as alive
        self.asked: set[str] = set()  # sent Rehello, no Hello back yet
        self.pids: dict[str, int] = {}
        self.awake = now
        self.stalls = 0  # stalls seen (for logs and metrics)

    def woke(self, now: float) -> float:
        """The owner runs again at ``now``; returns the stall credited (0: no stall)."""
        gap = now - self.awake
        self.awake = now
        if gap <= self.stall_ms:
            return 0.0
        self.stalls += 1
        for peer in self.last:
            self.last[peer] += gap
        return gap

    def heard(self, peer: str, now: float) -> Heard:
        """A message (any message) came from ``peer``."""
        self.last[peer] = now
        if peer in self.known:
            return Heard.KNOWN
        if peer in self.asked:
            return Heard.ASKED
        self.asked.add(peer)
        return Heard.ASK

    def hello(self, peer: str, pid: int, now: float) -> bool:
        """``peer`` introduced itself; True if it is a new process (another pid than the one
        it had), False if new to us or the same process coming back."""
        self.last[peer] = now
        self.known.add(peer)
        self.asked.discard(peer)
        old = self.pids.get(peer)
        self.pids[peer] = pid
        return old is not None and old != pid

    def down(self, peer: str) -> None:
        """``peer`` is taken as dead: its next message asks it to introduce itself again."""
        self.known.discard(peer)
        self.asked.discard(peer)

    def silent(self, now: float, exempt: frozenset[str] = frozenset()) -> list[str]:
        """Known peers not heard from for longer than the timeout."""
        return [
            p
            for p in sorted(self.known)
            if p not in exempt and now - self.last.get(p, now) > self.timeout_ms
        ]

    def age_ms(self, peer: str, now: float) -> float | None:
        last = self.last.get(peer)
        return None if last is None else max(0.0, now - last)

    def ages(self, now: float) -> dict[str, int]:
        """How long ago each peer ever heard was last heard (what the launcher watches)."""
        return {p: int(max(0.0, now - t)) for p, t in self.last.items()}
