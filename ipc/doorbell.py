"""Doorbell: a named FIFO per frontend that producers poke when a consumer has parked.

A FIFO works between unrelated processes, survives either side restarting (the path stays),
and its read end plugs straight into ``loop.add_reader``. Producers write one byte; a full
pipe means a wake-up is already pending, so EAGAIN is ignored.
"""

from __future__ import annotations

import contextlib
import errno
import os


def create_bell(path: str) -> None:
    os.mkfifo(path, 0o600)


class BellReader:
    """Consumer end. Opened read-write so it never sees EOF when producers come and go."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def clear(self) -> None:
        """Swallow every pending ring."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.fd, 4096):
                pass

    def close(self) -> None:
        os.close(self.fd)


class BellWriter:
    """Producer end."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_NONBLOCK)

    def ring(self) -> None:
        try:
            os.write(self.fd, b"\x01")
        except OSError as e:  # a full pipe already holds a pending wake-up
            if e.errno not in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise

    def close(self) -> None:
        os.close(self.fd)
