"""Throughput estimates from measured task service times (time passed in, no clock here)."""

from __future__ import annotations


class ServiceTime:
    """Exponentially weighted mean of dispatch-to-end times, in milliseconds.

    Until the first task completes there is no measurement; ``prior_ms`` stands in and is
    replaced by the first real observation.
    """

    def __init__(self, prior_ms: float = 1000.0, alpha: float = 0.2) -> None:
        self.mean_ms = prior_ms
        self.alpha = alpha
        self.samples = 0

    def observe(self, ms: float) -> None:
        if self.samples == 0:
            self.mean_ms = ms
        else:
            self.mean_ms += self.alpha * (ms - self.mean_ms)
        self.samples += 1

    def predicted_start_ms(self, ahead: int, total_slots: int, free_slots: int) -> int:
        """Time until a task with ``ahead`` tasks in front of it gets a slot."""
        if ahead < free_slots:
            return 0
        if total_slots <= 0:
            return int(self.mean_ms * (ahead + 1))
        waves = (ahead - free_slots) // total_slots + 1
        return int(self.mean_ms * waves)

    def slot_interval_ms(self, total_slots: int) -> int:
        """Mean time between two slots freeing up: the drain rate's inverse."""
        return max(1, int(self.mean_ms / max(1, total_slots)))
