"""Process helpers every orchd process shares: heap freezing, parent-death signals, the
listening socket frontends share."""

from __future__ import annotations

import ctypes
import gc
import signal
import socket

_PR_SET_PDEATHSIG = 1


def freeze_startup_heap() -> None:
    """Move what start-up left alive (modules, classes, config) into the collector's permanent
    generation, so that a full collection walks only what the process made since."""
    gc.collect()
    gc.freeze()


def die_with_parent() -> None:
    """``preexec_fn``: the kernel kills this child when its parent dies, even by SIGKILL."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


def listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock
