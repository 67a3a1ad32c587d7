"""When to restart something that died: exponential backoff plus a circuit breaker.

The one restart rule of orchd: supervisors use it for their engines, the launcher for its
children. Pure: times are passed in.
"""

from __future__ import annotations

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
        return min(self.cap_s, self.base_s * 2 ** (self.failures - 1))

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
