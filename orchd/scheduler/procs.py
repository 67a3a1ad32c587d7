"""CPU, memory and open files of every orchd process, read from ``/proc`` by pid.

Why here: the scheduler already knows every peer's pid (each ``Hello`` carries it), so one
reader at scrape time covers the launcher, the frontends, the supervisors and itself with no
extra messages and no psutil. Linux only, as orchd is (shared memory rings, eventfd
doorbells); a pid that is gone or unreadable is skipped, never an error.

Labels: ``role`` (launcher | scheduler | frontend | supervisor) and ``instance``
(``scheduler``, ``launcher``, ``frontend-0``, ``supervisor-r0``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from ipc.peers import Peer

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
LABELS = ("role", "instance")


@dataclass(frozen=True, slots=True)
class ProcSample:
    cpu_s: float
    rss_bytes: int
    open_fds: int


def read_proc(pid: int) -> ProcSample | None:
    """One process's figures (proc(5): ``stat`` fields 14-15 utime+stime in clock ticks,
    ``statm`` field 2 resident pages, one entry per open descriptor in ``fd/``)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        with open(f"/proc/{pid}/statm", "rb") as f:
            statm = f.read()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: count fields after the last ')'.
    rest = stat[stat.rindex(b")") + 2 :].split()
    utime, stime = int(rest[11]), int(rest[12])
    return ProcSample((utime + stime) / CLK_TCK, int(statm.split()[1]) * PAGE, fds)


def identity(peer: str, role: str) -> str:
    """The ``instance`` label of a peer."""
    who = Peer(peer)
    if who.role == "frontend":
        return f"frontend-{who.frontend_index}"
    if who.role == "supervisor":
        return f"supervisor-{who.replica_id}"
    return role


class Processes:
    """The pids to read: the scheduler itself and every peer that said hello."""

    def __init__(self) -> None:
        self.pids: dict[str, tuple[str, str, int]] = {"": ("scheduler", "scheduler", os.getpid())}

    def joined(self, peer: str, role: str, pid: int) -> bool:
        """Record a peer's pid; True when the peer was known already (a new incarnation)."""
        known = peer in self.pids
        self.pids[peer] = (role, identity(peer, role), pid)
        return known

    def left(self, peer: str) -> None:
        if peer:
            self.pids.pop(peer, None)

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "orchd_process_cpu_seconds",
            "CPU time (user + system) of an orchd process.",
            labels=LABELS,
        )
        rss = GaugeMetricFamily(
            "orchd_process_resident_memory_bytes",
            "Resident memory of an orchd process.",
            labels=LABELS,
        )
        fds = GaugeMetricFamily(
            "orchd_process_open_fds", "Open file descriptors of an orchd process.", labels=LABELS
        )
        for role, instance, pid in sorted(self.pids.values()):
            s = read_proc(pid)
            if s is None:
                continue
            cpu.add_metric([role, instance], s.cpu_s)
            rss.add_metric([role, instance], s.rss_bytes)
            fds.add_metric([role, instance], s.open_fds)
        yield from (cpu, rss, fds)
