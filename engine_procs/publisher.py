"""The supervisor's side of the token rings: one ring and one doorbell per frontend.

Records wait in a per-ring backlog until they fit; the producer never drops or reorders.
``publish`` writes everything pending with one ``write_seq`` store per ring and rings a
doorbell only for a consumer that has parked since the last ring.
"""

from __future__ import annotations

from ipc.doorbell import BellWriter
from ipc.ring import RingWriter

Record = tuple[int, int, int, bytes]  # (slot, seq, kind, payload)


class Publisher:
    def __init__(self, ring_names: list[str], bell_paths: list[str]) -> None:
        self.writers = [RingWriter(n) for n in ring_names]
        self.bells = [BellWriter(b) for b in bell_paths]
        self.backlog: list[list[Record]] = [[] for _ in ring_names]

    def add(self, frontend: int, record: Record) -> None:
        self.backlog[frontend].append(record)

    def publish(self) -> bool:
        """Write what fits; True if some frontend's ring is still full (records wait)."""
        stuck = False
        for f, pend in enumerate(self.backlog):
            if not pend:
                continue
            w = self.writers[f]
            n = w.write_batch(pend)
            if n:
                del pend[:n]
                if w.needs_bell():
                    self.bells[f].ring()
            if pend:
                stuck = True
        return stuck

    def pending(self) -> bool:
        return any(self.backlog)

    def close(self) -> None:
        for w in self.writers:
            w.close()
        for b in self.bells:
            b.close()
