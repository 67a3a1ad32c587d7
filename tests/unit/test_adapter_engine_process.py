"""Engine lifecycle: a replica's engine command is started, watched, restarted and stopped;
the restart policy backs off and opens its circuit breaker."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import psutil
import pytest

from engine_procs.adapters.llamacpp import LlamaCppAdapter
from engine_procs.engine_process import EngineProcess, render_command
from orchd.config import Endpoint, Replica
from orchd.core.restart import RestartPolicy
from tests.fakes.scenarios import req
from tests.fakes.sink import RecordingSink, wait_until

ROOT = str(Path(__file__).resolve().parents[2])
FAKE = [sys.executable, "-m", "tests.fakes.engines", "llamacpp", "--port", "{port}"]


def test_backoff_doubles_up_to_the_cap_then_the_breaker_opens() -> None:
    p = RestartPolicy(0.1, 0.5, threshold=5, cooldown_s=30.0, stable_after_s=10.0)
    assert p.delay() == 0.0  # the first start is immediate
    delays = []
    for _ in range(5):
        p.start_failed()
        delays.append(p.delay())
    assert delays == [0.1, 0.2, 0.4, 0.5, 30.0]
    assert p.open
    p.start_failed()  # the one try after the cool-down failed: open again
    assert p.open and p.delay() == 30.0
    p.ready(100.0)
    p.died(200.0)  # served 100 s: a healthy engine that died, restart at once
    assert p.failures == 0 and p.delay() == 0.0


def test_a_crash_loop_backs_off() -> None:
    p = RestartPolicy(0.1, 5.0, threshold=3, cooldown_s=7.0, stable_after_s=10.0)
    p.ready(0.0)
    p.died(1.0)  # died 1 s after it became ready: that counts as a failure
    assert p.delay() == 0.1
    p.ready(2.0)
    p.died(3.0)
    p.ready(4.0)
    p.died(5.0)
    assert p.open and p.delay() == 7.0


def test_render_command_substitutes_every_placeholder() -> None:
    argv = render_command(
        ["srv", "-m", "{model_path}", "--port={port}", "--alias", "{model}"],
        model_path="/m/x.gguf",
        port=8123,
        model="tiny",
    )
    assert argv == ["srv", "-m", "/m/x.gguf", "--port=8123", "--alias", "tiny"]


def test_model_path_follows_a_file_model_ref() -> None:
    ep = Endpoint(model_path="/fallback.gguf")
    a = LlamaCppAdapter(Replica(id="r", model_ref="file:///m/new.gguf", endpoint=ep), "", None)  # type: ignore[arg-type]
    assert a.model_path() == "/m/new.gguf"
    b = LlamaCppAdapter(Replica(id="r", model_ref="hf:org/x", endpoint=ep), "", None)  # type: ignore[arg-type]
    assert b.model_path() == "/fallback.gguf"


def test_engine_inherits_the_environment_and_logs_to_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    log = tmp_path / "engine.log"
    code = "import os; print('devices=' + os.environ['CUDA_VISIBLE_DEVICES'])"

    async def main() -> None:
        proc = EngineProcess([sys.executable, "-c", code], str(log))
        await proc.start()
        assert await proc.wait() == 0
        assert "devices=3,5" in proc.tail_text()

    asyncio.run(main())
    assert "devices=3,5" in log.read_text()


def adapter(
    command: list[str], ready_timeout_s: float = 20.0
) -> tuple[LlamaCppAdapter, RecordingSink]:
    ep = Endpoint(command=command, model="m1", ready_timeout_s=ready_timeout_s)
    sink = RecordingSink()
    return LlamaCppAdapter(Replica(id="r0", engine="llamacpp", endpoint=ep), "", sink), sink


def test_engine_command_starts_serves_dies_and_restarts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # `-m tests.fakes.engines` resolves from the repo root
    a, sink = adapter([*FAKE, "--exit-after", "2", "--loading-s", "0.2", "--version", "{model}"])

    async def main() -> None:
        await a.start(timeout_s=1.0)
        first = a.engine_pid()
        assert first is not None and psutil.pid_exists(first)
        assert a.engine_version == "bm1"  # {model} reached the engine's argv
        for rid in (1, 2):
            a.submit(req(rid, 4))
            assert (await sink.wait_end(rid)).kind == "finish"
        # The engine exits after its second request: the adapter reports a dead engine.
        await wait_until(lambda: sink.dead, 10, "engine death")
        assert "exited with status 3" in sink.dead[0]
        # What the supervisor does next: stop, start again.
        await a.stop()
        await a.start(timeout_s=1.0)
        second = a.engine_pid()
        assert second is not None and second != first
        a.submit(req(3, 4))
        assert (await sink.wait_end(3)).kind == "finish"
        await a.stop()
        await wait_until(lambda: not psutil.pid_exists(second), 10, "engine stopped")
        assert len(sink.dead) == 1  # stopping on purpose is not a death

    asyncio.run(main())


def test_engine_that_exits_before_ready_fails_start_with_its_output() -> None:
    a, _ = adapter([sys.executable, "-c", "import sys; print('no GPU here'); sys.exit(2)"])

    async def main() -> None:
        with pytest.raises(RuntimeError, match="exited with status 2.*no GPU here"):
            await a.start(timeout_s=1.0)

    asyncio.run(main())


def test_engine_command_that_cannot_run() -> None:
    a, _ = adapter([os.path.join(ROOT, "no-such-engine-binary")])

    async def main() -> None:
        with pytest.raises(RuntimeError, match="cannot start engine"):
            await a.start(timeout_s=1.0)

    asyncio.run(main())


def test_an_endpoint_is_required() -> None:
    a = LlamaCppAdapter(Replica(id="r9", engine="llamacpp"), "", RecordingSink())

    async def main() -> None:
        with pytest.raises(RuntimeError, match="r9: the llamacpp adapter needs endpoint.url"):
            await a.start(timeout_s=1.0)

    asyncio.run(main())
