"""The NVML collector against a fake NVML module: series and labels, ownership mapping, a
device missing a reading, no driver, sampling off the scrape path, idling."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchd.config import Replica
from orchd.telemetry import NvmlCollector
from tests.support.wait import wait_for as wait_until


class NVMLError(Exception):
    pass


@dataclass
class Dev:
    uuid: str
    name: str
    util: int  # percent
    used: int
    total: int
    power_mw: int | None
    temp: int
    sm_mhz: int


class FakeNvml:
    """The slice of pynvml the collector uses, counting every device call."""

    NVML_TEMPERATURE_GPU = 0
    NVML_CLOCK_SM = 1
    NVMLError = NVMLError

    def __init__(self, devices: list[Dev], init_error: str = "") -> None:
        self.devices = devices
        self.init_error = init_error
        self.calls = 0
        self.shut = False
        self.lock = threading.Lock()

    def _dev(self, h: int) -> Dev:
        with self.lock:
            self.calls += 1
        return self.devices[h]

    def nvmlInit(self) -> None:
        if self.init_error:
            raise NVMLError(self.init_error)

    def nvmlShutdown(self) -> None:
        self.shut = True

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlSystemGetDriverVersion(self) -> str:
        return "550.54.15"

    def nvmlDeviceGetUUID(self, h: int) -> str:
        return self._dev(h).uuid

    def nvmlDeviceGetName(self, h: int) -> bytes:
        return self._dev(h).name.encode()  # older pynvml returns bytes

    def nvmlDeviceGetUtilizationRates(self, h: int) -> Any:
        return SimpleNamespace(gpu=self._dev(h).util, memory=0)

    def nvmlDeviceGetMemoryInfo(self, h: int) -> Any:
        d = self._dev(h)
        return SimpleNamespace(used=d.used, total=d.total, free=d.total - d.used)

    def nvmlDeviceGetPowerUsage(self, h: int) -> int:
        p = self._dev(h).power_mw
        if p is None:
            raise NVMLError("Not Supported")
        return p

    def nvmlDeviceGetTemperature(self, h: int, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._dev(h).temp

    def nvmlDeviceGetClockInfo(self, h: int, clock: int) -> int:
        assert clock == self.NVML_CLOCK_SM
        return self._dev(h).sm_mhz


GiB = 1 << 30


def two_gpus() -> FakeNvml:
    return FakeNvml(
        [
            Dev("GPU-aaaa-1111", "NVIDIA H100", 42, 10 * GiB, 80 * GiB, 350_500, 61, 1980),
            Dev("GPU-bbbb-2222", "NVIDIA H100", 7, 1 * GiB, 80 * GiB, None, 40, 345),
        ]
    )


REPLICAS = [
    Replica(id="r0", pool_id="p0", engine="llamacpp", devices="0"),
    Replica(id="r1", pool_id="p1", engine="vllm", devices="GPU-bbbb"),
    Replica(id="r2", pool_id="p2", engine="mock", devices=""),
]


def scrape(c: NvmlCollector) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    reg = CollectorRegistry()
    reg.register(c)
    text = generate_latest(reg).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def labels(**kw: str) -> frozenset[tuple[str, str]]:
    base = {"engine": "", "engine_version": "", "pool_id": "", "replica_id": ""}
    return frozenset({**base, **kw}.items())


def test_series_per_device_labelled_with_the_owning_replica() -> None:
    c = NvmlCollector(REPLICAS, nvml=two_gpus(), interval_s=60)  # type: ignore[arg-type]
    try:
        c.set_engine_version("r0", "b4321")
        got = scrape(c)
        own0 = dict(
            device="0", engine="llamacpp", engine_version="b4321", pool_id="p0", replica_id="r0"
        )
        own1 = dict(device="1", engine="vllm", pool_id="p1", replica_id="r1")
        assert got[("gpu_utilization", labels(**own0))] == pytest.approx(0.42)
        assert got[("vram_used_bytes", labels(**own0))] == 10 * GiB
        assert got[("vram_total_bytes", labels(**own0))] == 80 * GiB
        assert got[("gpu_power_watts", labels(**own0))] == pytest.approx(350.5)
        assert got[("gpu_temperature_celsius", labels(**own0))] == 61
        assert got[("gpu_sm_clock_mhz", labels(**own0))] == 1980
        info = dict(uuid="GPU-aaaa-1111", name="NVIDIA H100", driver_version="550.54.15")
        assert got[("gpu_info", labels(**own0, **info))] == 1
        # Device 1 is owned by UUID; it cannot report power: that one series is absent.
        assert got[("gpu_utilization", labels(**own1))] == pytest.approx(0.07)
        assert not any(n == "gpu_power_watts" and ("device", "1") in ls for n, ls in got)
        assert sum(1 for n, _ in got if n == "gpu_utilization") == 2  # one per device
    finally:
        c.close()


def test_free_vram_for_placement() -> None:
    c = NvmlCollector(REPLICAS, nvml=two_gpus(), interval_s=60)  # type: ignore[arg-type]
    try:
        assert c.free_vram_by_replica() == {"r0": 70 * GiB, "r1": 79 * GiB}
        assert [s.vram_free for s in c.snapshot()] == [70 * GiB, 79 * GiB]
    finally:
        c.close()


def test_no_driver_means_no_gpu_series_and_one_log_line(capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeNvml([], init_error="Driver Not Loaded")
    c = NvmlCollector(REPLICAS, nvml=fake)  # type: ignore[arg-type]
    assert not c.available
    lines = [json.loads(x) for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(lines) == 1
    assert lines[0]["narration"] == "NVML unavailable: GPU metrics are off, orchd runs on"
    assert lines[0]["reason"] == "Driver Not Loaded"
    assert scrape(c) == {}
    assert c.snapshot() == [] and c.free_vram_by_replica() == {}
    c.close()


def test_scrapes_read_the_sample_and_never_call_nvml() -> None:
    fake = two_gpus()
    c = NvmlCollector(REPLICAS, nvml=fake, interval_s=60)  # type: ignore[arg-type]
    try:
        reg = CollectorRegistry(auto_describe=True)
        reg.register(c)  # describe() only: no NVML call
        before = fake.calls
        for _ in range(5):
            generate_latest(reg)
            c.snapshot()
        assert fake.calls == before
    finally:
        c.close()
    assert fake.shut


def test_the_sampler_follows_the_devices() -> None:
    fake = two_gpus()
    c = NvmlCollector(REPLICAS, nvml=fake, interval_s=0.01)  # type: ignore[arg-type]
    try:
        fake.devices[0].util = 99
        wait_until(lambda: c.snapshot()[0].utilization == pytest.approx(0.99), 5, "new sample")
    finally:
        c.close()


def test_idle_sampler_stops_calling_nvml_and_wakes_on_a_read() -> None:
    now = [0.0]
    fake = two_gpus()
    c = NvmlCollector(  # type: ignore[arg-type]
        REPLICAS, nvml=fake, interval_s=0.01, idle_after_s=30.0, clock=lambda: now[0]
    )
    try:
        now[0] = 100.0  # nobody read for 100 s
        wait_until(lambda: c.asleep, 5, "sampler idle")
        now[0] = 200.0
        idle_calls = fake.calls
        time_limit = time.monotonic() + 0.2
        while time.monotonic() < time_limit:  # it stays idle: no NVML calls at all
            assert fake.calls == idle_calls
            time.sleep(0.02)
        # A read wakes it; the stale sample is not served as current.
        assert c.snapshot() == []
        wait_until(lambda: fake.calls > idle_calls, 5, "sampler awake")
        wait_until(lambda: len(c.snapshot()) == 2, 5, "fresh sample")
    finally:
        c.close()
