"""A frontend's own counters and gauges, as plain integers.

Why not prometheus_client objects: the frontend does not expose them itself. It sends them to
the scheduler (``FrontendStats``, each heartbeat and before each scrape it answers), whose
exposition carries every frontend's; see :mod:`orchd.scheduler.metrics_native`.
"""

from __future__ import annotations


class Tally:
    """One of this frontend's counters or gauges; the scheduler exports them all
    (``FrontendStats``), so any frontend answering a scrape shows every frontend's."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1

    def dec(self) -> None:
        self.value -= 1
