"""Idle-connection flood against a running orchd: open N connections that send nothing (or
half a request), then time new clients. With the edge's bounds (orchd/frontend/edge.py) new
clients are served at once and the idle connections are closed within the header timeout.

    python -m perf.idle_conns --url http://127.0.0.1:8080 --conns 2000 --key dev
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import socket
import time
from urllib.parse import urlparse


def request(host: str, port: int, key: str) -> tuple[int, float]:
    t0 = time.perf_counter()
    with socket.create_connection((host, port), timeout=10) as s:
        s.sendall(
            f"GET /v1/capabilities HTTP/1.1\r\nHost: {host}\r\nX-API-Key: {key}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        head = s.recv(65536)
    return int(head.split()[1]), (time.perf_counter() - t0) * 1000.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--url", default="http://127.0.0.1:8080")
    ap.add_argument("--conns", type=int, default=2000)
    ap.add_argument("--key", default="dev")
    ap.add_argument("--half", action="store_true", help="send half a request on each")
    args = ap.parse_args(argv)
    u = urlparse(args.url)
    host, port = u.hostname or "127.0.0.1", u.port or 80
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.conns + 64
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))
    socks: list[socket.socket] = []
    t0 = time.perf_counter()
    try:
        for _ in range(args.conns):
            s = socket.create_connection((host, port), timeout=10)
            if args.half:
                s.sendall(f"GET / HTTP/1.1\r\nHost: {host}\r\n".encode())
            socks.append(s)
        opened = time.perf_counter() - t0
        results = [request(host, port, args.key) for _ in range(20)]
        closed = 0
        for s in socks:
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                if s.recv(1) == b"":
                    closed += 1
        ok = sum(1 for status, _ in results if status == 200)
        worst = max(ms for _, ms in results)
        print(
            f"{args.conns} idle connections opened in {opened:.2f} s; new clients: "
            f"{ok}/20 answered 200, slowest {worst:.1f} ms; {closed} idle ones already closed"
        )
        return 0 if ok == 20 else 1
    finally:
        for s in socks:
            s.close()


if __name__ == "__main__":
    raise SystemExit(main())
