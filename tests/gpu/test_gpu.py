"""On a real NVIDIA GPU (skipped elsewhere): NVML through the collector, and the torch engine
decoding 64 concurrent tasks on the GPU while /metrics shows the device busy and its memory in
use. Run with ``make test`` on a GPU host, or ``pytest -m gpu``."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from orchd.config import Replica
from orchd.telemetry.nvml import NvmlCollector
from tests.integration.conftest import run_task
from tests.support.daemon import Daemon
from tests.support.sse import sync_request

pytestmark = pytest.mark.gpu

CONFIG = """
[[replicas]]
id = "g0"
pool_id = "torch"
engine = "torch"
model_ref = "random:small"
slots = 64
devices = "0"
[replicas.endpoint]
ready_timeout_s = 300
[replicas.torch]
device = "cuda"
max_batch = 64
max_seq_len = 1024
"""


def test_nvml_collector_reads_the_real_devices() -> None:
    c = NvmlCollector([Replica(id="g0", devices="0", engine="torch")], interval_s=0.2)
    try:
        assert c.available and c.driver_version
        samples = c.snapshot()
        assert samples and samples[0].vram_total and samples[0].vram_total > 0
        assert samples[0].name and samples[0].uuid.startswith("GPU-")
        assert c.free_vram_by_replica()["g0"] > 0
    finally:
        c.close()


@pytest.fixture(scope="module")
def gpud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    with Daemon(tmp_path_factory.mktemp("gpu"), CONFIG) as d:
        yield d


def gauges(d: Daemon) -> dict[str, float]:
    _, _, raw = sync_request(d.host, d.port, "GET", "/metrics", {})
    out: dict[str, float] = {}
    for name in ("gpu_utilization", "vram_used_bytes"):
        for m in re.finditer(rf'^{name}{{[^}}]*device="0"[^}}]*}} (\S+)$', raw.decode(), re.M):
            out[name] = float(m.group(1))
    return out


def test_torch_engine_decodes_64_streams_on_the_gpu_and_metrics_move(gpud: Daemon) -> None:
    idle = gauges(gpud)
    assert "gpu_utilization" in idle and "vram_used_bytes" in idle
    seen: list[dict[str, float]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.25):
            seen.append(gauges(gpud))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(64) as pool:
            streams = list(
                pool.map(
                    lambda i: run_task(
                        gpud,
                        engine="torch",
                        model_ref="random:small",
                        prompt=f"gpu stream {i}",
                        max_tokens=256,
                        seed=i,
                    ),
                    range(64),
                )
            )
    finally:
        done.set()
        watcher.join()
    for s in streams:
        assert s.events[-1].event == "end" and s.events[-1].json["tokens_out"] == 256
    assert max(g.get("gpu_utilization", 0.0) for g in seen) > 0.0
    assert max(g.get("vram_used_bytes", 0.0) for g in seen) > 0.0
