"""The supervisor's side of the token rings: one ring and one doorbell per frontend.

Records wait in a per-ring backlog until they fit; the producer never drops or reorders.
``publish`` writes everything pending with one ``write_seq`` store per ring and rings a
doorbell only for a consumer that has parked since the last ring.
"""

from __future__ import annotations

from ipc.doorbell import BellWriter
from ipc.frames import KIND_DATA
from ipc.ring import RingWriter

Record = tuple[int, int, int, bytes]  # (slot, seq, kind, payload)


class Publisher:
    def __init__(self, ring_names: list[str], bell_paths: list[str]) -> None:
        self.writers = [RingWriter(n) for n in ring_names]
        self.bells = [BellWriter(b) for b in bell_paths]
        self.backlog: list[list[Record]] = [[] for _ in ring_names]
        # A record never takes more than a quarter of its ring (a long transcript replayed
        # at once is cut into pieces; the frontend joins a stream's payloads in order).
        self.max_payload = [w.capacity // 4 for w in self.writers]

    def add(self, frontend: int, record: Record) -> None:
        slot, seq, kind, payload = record
        cap = self.max_payload[frontend]
        if len(payload) <= cap:
            self.backlog[frontend].append(record)
            return
        # Cut only between SSE frames: the frontend may append a frame of its own to a
        # stream (an error), which must never land inside another.
        start, n = 0, len(payload)
        while start < n:
            end = n
            if n - start > cap:
                cut = payload.rfind(b"\n\n", start, start + cap)
                end = cut + 2 if cut >= start else start + cap
            piece = payload[start:end]
            self.backlog[frontend].append((slot, seq, kind if end == n else KIND_DATA, piece))
            start = end

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
