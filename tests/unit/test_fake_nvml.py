"""The fake NVML (tests/fakes/nvml.py) behaves as NVML's reference says, and orchd loads it in
place of pynvml when ``ORCHD_NVML_MODULE`` names it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from orchd.config import Replica
from orchd.telemetry.gpus import count_gpus
from orchd.telemetry.nvml import NvmlCollector, load_nvml
from tests.fakes import nvml as fake


@pytest.fixture
def clock() -> Iterator[list[float]]:
    now = [1000.0]
    fake.set_clock(lambda: now[0])
    try:
        yield now
    finally:
        fake.set_clock(__import__("time").time)


def test_queries_before_init_and_extra_shutdowns_are_uninitialized() -> None:
    with pytest.raises(fake.NVMLError) as e:
        fake.nvmlDeviceGetCount()
    assert e.value.value == fake.NVML_ERROR_UNINITIALIZED and str(e.value) == "Uninitialized"
    with pytest.raises(fake.NVMLError_Uninitialized):
        fake.nvmlShutdown()
    fake.nvmlInit()
    fake.nvmlInit()  # reference-counted: two inits need two shutdowns
    fake.nvmlShutdown()
    assert fake.nvmlDeviceGetCount() == 2
    fake.nvmlShutdown()
    with pytest.raises(fake.NVMLError_Uninitialized):
        fake.nvmlDeviceGetHandleByIndex(0)


def test_bad_arguments_are_invalid_argument() -> None:
    fake.nvmlInit()
    try:
        with pytest.raises(fake.NVMLError_InvalidArgument):
            fake.nvmlDeviceGetHandleByIndex(2)
        h = fake.nvmlDeviceGetHandleByIndex(0)
        with pytest.raises(fake.NVMLError) as e:
            fake.nvmlDeviceGetTemperature(h, 7)
        assert e.value.value == fake.NVML_ERROR_INVALID_ARGUMENT
        with pytest.raises(fake.NVMLError_InvalidArgument):
            fake.nvmlDeviceGetClockInfo(h, 99)
    finally:
        fake.nvmlShutdown()


def test_readings_are_in_nvml_units_and_move_with_time(clock: list[float]) -> None:
    fake.nvmlInit()
    try:
        h0, h1 = (fake.nvmlDeviceGetHandleByIndex(i) for i in range(2))
        assert fake.nvmlDeviceGetUUID(h0) != fake.nvmlDeviceGetUUID(h1)
        assert fake.nvmlDeviceGetUUID(h0).startswith("GPU-")

        def read(h: fake.Handle) -> tuple[int, int, int, int, int]:
            mem = fake.nvmlDeviceGetMemoryInfo(h)
            assert mem.used + mem.free == mem.total == 80 * fake.GiB
            return (
                fake.nvmlDeviceGetUtilizationRates(h).gpu,
                mem.used,
                fake.nvmlDeviceGetPowerUsage(h),
                fake.nvmlDeviceGetTemperature(h, fake.NVML_TEMPERATURE_GPU),
                fake.nvmlDeviceGetClockInfo(h, fake.NVML_CLOCK_SM),
            )

        first = read(h0)
        assert 0 <= first[0] <= 100 and 60_000 <= first[2] <= 700_000  # percent, milliwatts
        assert first != read(h1)  # the devices are out of phase
        clock[0] += fake.PERIOD_S / 4
        later = read(h0)
        assert all(a != b for a, b in zip(first, later, strict=True))  # every reading moved
        clock[0] += fake.PERIOD_S * 3 / 4
        assert read(h0) == first  # periodic
    finally:
        fake.nvmlShutdown()


def test_orchd_loads_the_module_the_env_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHD_NVML_MODULE", "tests.fakes.nvml")
    assert load_nvml() is fake
    assert count_gpus() == 2
    c = NvmlCollector([Replica(id="r0", devices="1")], interval_s=60)
    try:
        assert c.available
        reg = CollectorRegistry()
        reg.register(c)
        got = {
            (s.name, s.labels["device"], s.labels["replica_id"])
            for f in text_string_to_metric_families(generate_latest(reg).decode())
            for s in f.samples
        }
        for name in ("gpu_utilization", "vram_used_bytes", "gpu_power_watts", "gpu_info"):
            assert (name, "0", "") in got and (name, "1", "r0") in got
    finally:
        c.close()
    with pytest.raises(fake.NVMLError_Uninitialized):  # the collector shut what it opened
        fake.nvmlShutdown()


def test_a_missing_module_means_no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCHD_NVML_MODULE", "tests.fakes.no_such_nvml")
    with pytest.raises(ImportError):
        load_nvml()
    assert count_gpus() == 0
    c = NvmlCollector([], interval_s=60)
    assert not c.available
    c.close()
