"""The FIFO doorbell (ipc/doorbell.py)."""

from __future__ import annotations

import os
import select
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ipc.doorbell import BellReader, BellWriter, create_bell


def readable(fd: int, timeout: float) -> bool:
    r, _, _ = select.select([fd], [], [], timeout)
    return fd in r


@pytest.fixture
def bell(tmp_path: Path) -> Iterator[tuple[BellReader, BellWriter]]:
    path = str(tmp_path / "fe0.bell")
    create_bell(path)
    reader = BellReader(path)
    writer = BellWriter(path)
    try:
        yield reader, writer
    finally:
        writer.close()
        reader.close()


def test_create_bell_makes_private_fifo(tmp_path: Path) -> None:
    path = tmp_path / "b.bell"
    create_bell(str(path))
    st = os.stat(path)
    assert stat.S_ISFIFO(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


def test_ring_makes_reader_readable_and_clear_empties(bell) -> None:
    reader, writer = bell
    assert not readable(reader.fd, 0.0)
    writer.ring()
    assert readable(reader.fd, 1.0)
    reader.clear()
    assert not readable(reader.fd, 0.0)
    # Several rings are all swallowed by one clear.
    for _ in range(10):
        writer.ring()
    assert readable(reader.fd, 1.0)
    reader.clear()
    assert not readable(reader.fd, 0.0)


def test_clear_on_empty_bell_does_not_block_or_raise(bell) -> None:
    reader, _ = bell
    reader.clear()
    assert not readable(reader.fd, 0.0)


def test_ringing_a_full_pipe_does_not_raise(bell) -> None:
    reader, writer = bell
    # Fill the pipe to the brim behind the bell's back.
    written = 0
    while True:
        try:
            written += os.write(writer.fd, b"\x00" * 4096)
        except BlockingIOError:
            break
    assert written > 0
    # One more byte does not fit, and the bell shrugs it off.
    with pytest.raises(BlockingIOError):
        os.write(writer.fd, b"\x01")
    for _ in range(3):
        writer.ring()
    assert readable(reader.fd, 1.0)
    reader.clear()
    assert not readable(reader.fd, 0.0)
    writer.ring()
    assert readable(reader.fd, 1.0)


def test_reader_survives_writer_going_away(tmp_path: Path) -> None:
    """Opened read-write, the reader never sees EOF (which would read as always-readable)."""
    path = str(tmp_path / "b.bell")
    create_bell(path)
    reader = BellReader(path)
    try:
        w = BellWriter(path)
        w.ring()
        w.close()
        assert readable(reader.fd, 1.0)
        reader.clear()
        assert not readable(reader.fd, 0.0)
        w2 = BellWriter(path)
        w2.ring()
        assert readable(reader.fd, 1.0)
        w2.close()
    finally:
        reader.close()
