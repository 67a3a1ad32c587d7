"""The frontend's line to the scheduler (orchd/frontend/client.py) against a real ROUTER that
welcomes it and then answers nothing: a request it never answers fails retriably."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import zmq

from ipc import protocol as p
from orchd.core.errors import Code, OrchdError
from orchd.frontend.client import SchedulerClient


def test_a_request_the_scheduler_never_answers_is_a_retriable_503(tmp_path: Path) -> None:
    addr = f"ipc://{tmp_path}/sched.sock"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(addr)

    async def main() -> OrchdError:
        client = SchedulerClient(addr, 0, heartbeat_s=60.0)
        loop = asyncio.get_running_loop()

        def welcome() -> None:  # the scheduler says hello back, then nothing more
            ident, data = router.recv_multipart()
            assert isinstance(p.decode(data), p.Hello)
            router.send_multipart([ident, p.encode(p.Welcome())])

        starting = loop.create_task(client.start(timeout_s=10))
        await loop.run_in_executor(None, welcome)
        await starting
        try:
            with pytest.raises(OrchdError) as e:
                await client.request(p.Query(client.next_id(), "capabilities", {}), timeout=0.1)
            return e.value
        finally:
            await client.stop()

    try:
        err = asyncio.run(main())
    finally:
        router.close(0)
        ctx.term()
    assert err.code is Code.POOL_UNAVAILABLE and err.status == 503 and err.retriable
    assert err.retry_after_ms and "did not answer in time" in err.message
