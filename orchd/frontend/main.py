"""Frontend process entry: uvicorn (uvloop + httptools) on a SO_REUSEPORT socket, so that any
number of frontend processes share the port and the kernel spreads connections."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import sys

import uvicorn

from ipc.proc import listen_socket
from orchd import log
from orchd.config import load_resolved
from orchd.frontend.app import Frontend
from orchd.frontend.edge import FD_RESERVE, Edge, fds_needed, raise_nofile


class Server(uvicorn.Server):
    """uvicorn's server, ticking once a second instead of ten times (an idle orchd should
    cost ~nothing; the Date header and the exit check only need a one-second tick)."""

    async def main_loop(self) -> None:
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000
            await asyncio.sleep(1.0)
            should_exit = await self.on_tick(counter)


# glibc's mallopt() parameters, and the values the frontend pins (glibc's initial ones).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MALLOC_THRESHOLD = 128 << 10


def pin_malloc_thresholds() -> None:
    """Fix glibc's mmap threshold. By default glibc raises it to the size of each large block
    freed (up to 32 MiB), so after one burst (a slow client's backlog, a long drain) blocks
    of that size come from the heap, which keeps its high-water mark: RSS crept up with the
    largest burst so far. Fixed, such blocks are mmapped and returned when freed. A no-op
    without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, MALLOC_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, MALLOC_THRESHOLD)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pin_malloc_thresholds()
    res = load_resolved(argv[0])
    index = int(argv[1])
    s, lim = res.config.server, res.config.limits
    log.setup(f"frontend-{index}", s.log_level, s.log_format)
    edge = Edge(lim)
    needed = fds_needed(lim)
    soft, hard = raise_nofile(needed)
    if soft < needed:
        edge.max_connections = max(1, (soft - FD_RESERVE) * 4 // 5)
        log.warning(
            "the open-file limit is below what limits.max_connections needs: connections "
            "capped lower; raise the hard limit (ulimit -Hn, LimitNOFILE=) to lift it",
            frontend=index,
            open_files_limit=soft,
            hard_limit=hard,
            needed=needed,
            max_connections=edge.max_connections,
        )
    sock = listen_socket(s.host, s.port)
    sock.listen(4096)
    config = uvicorn.Config(
        Frontend(res, index).app(),
        loop="uvloop",
        http=edge.protocol(),
        timeout_keep_alive=lim.keepalive_timeout_ms / 1000.0,  # type: ignore[arg-type]
        lifespan="on",
        access_log=False,
        proxy_headers=False,  # orchd is the edge; X-Forwarded-* is not trusted here
        log_level="warning",
        timeout_graceful_shutdown=5,
        backlog=4096,
    )
    Server(config).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
