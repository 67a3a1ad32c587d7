"""Rings of an orchd killed with -9 are removed by the next launcher; live ones are not."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

from ipc.ring import create_ring, unlink_ring
from orchd.launcher import reclaim_stale_rings


def test_stale_rings_are_reclaimed_and_live_ones_kept() -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid = int(gone.stdout)  # this process has exited: nobody owns its rings
    tag = uuid.uuid4().hex[:6]
    dead = f"orchd-{dead_pid}-{tag}-r0-f0"
    live = f"orchd-{os.getpid()}-{tag}-r0-f0"
    create_ring("/" + dead, 4096)
    create_ring("/" + live, 4096)
    try:
        removed = reclaim_stale_rings()
        assert dead in removed and live not in removed
        assert not os.path.exists(f"/dev/shm/{dead}")
        assert os.path.exists(f"/dev/shm/{live}")
    finally:
        unlink_ring("/" + dead)
        unlink_ring("/" + live)
