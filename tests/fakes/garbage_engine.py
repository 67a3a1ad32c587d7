"""An engine process that says it is ready, then answers its first message with bytes that
are no engine message: for the adapter's handling of an unreadable step."""

from __future__ import annotations

import os
import sys

from engine_procs import engine_link
from ipc import protocol as p


def main() -> int:
    ctx, sock = engine_link.connect(sys.argv[1])
    sock.send(p.encode(p.EngReady("garbage-1", 16, os.getpid())))
    sock.recv()
    sock.send(b"\xc1 not msgpack")
    sock.recv()  # until killed
    return 0


if __name__ == "__main__":
    sys.exit(main())
