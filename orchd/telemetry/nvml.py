"""GPU telemetry from NVML (``pynvml``, package ``nvidia-ml-py``), as a Prometheus collector.

Why a sampler thread: NVML calls are cheap but not free (a few hundred microseconds to a few
milliseconds each on busy GPUs), so neither a scrape nor the scheduler's placement ever calls
NVML itself. A daemon thread samples every device about once a second into an immutable
snapshot; ``collect()`` and :meth:`NvmlCollector.snapshot` only read the latest one. The thread
samples only while someone reads (a scrape or a snapshot within ``idle_after_s``), so an idle
orchd makes no NVML calls at all. ctypes releases the GIL during each NVML call.

No NVML (no driver, no GPU, no library): one line is logged, the GPU series are absent and
everything else runs on.

Usage (the owner of a prometheus registry; nothing here registers itself)::

    collector = NvmlCollector(cfg.replicas)          # or nvml=<a fake module> in tests
    registry.register(collector)                       # series appear on /metrics
    collector.set_engine_version("r0", "b4321")        # when a replica reports its version
    collector.snapshot()                               # list[DeviceSample], e.g. free VRAM
    collector.close()

Series, one per NVML device, labelled ``device`` (the NVML index) plus ``engine,
engine_version, pool_id, replica_id`` of the replica(s) whose ``devices`` name it (joined by
``,`` when several share a device; empty when none): ``gpu_utilization`` (0..1),
``vram_used_bytes``, ``vram_total_bytes``, ``gpu_power_watts``, ``gpu_temperature_celsius``,
``gpu_sm_clock_mhz``, and ``gpu_info`` (value 1) which adds ``uuid``, ``name`` and
``driver_version``. Replica ``devices`` entries are matched as NVML indices or as UUIDs
(``GPU-...``); indices assume CUDA and NVML agree on order (``CUDA_DEVICE_ORDER=PCI_BUS_ID``).

Test/demo hook: the environment variable ``ORCHD_NVML_MODULE`` names a module imported instead
of ``pynvml`` (:func:`load_nvml`). ``ORCHD_NVML_MODULE=tests.fakes.nvml`` (run from the repo
root) gives two fake GPUs whose load moves with time, for tests and demos without a GPU. Never
in production: its figures are invented.
"""

from __future__ import annotations

import importlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from orchd import log
from orchd.config import Replica

OWNER_LABELS = ("engine", "engine_version", "pool_id", "replica_id")
LABELS = ("device", *OWNER_LABELS)
INFO_LABELS = (*LABELS, "uuid", "name", "driver_version")


@dataclass(frozen=True, slots=True)
class DeviceSample:
    index: int
    uuid: str
    name: str
    utilization: float | None  # 0..1
    vram_used: int | None  # bytes
    vram_total: int | None
    power_w: float | None
    temperature_c: float | None
    sm_clock_mhz: float | None

    @property
    def vram_free(self) -> int | None:
        if self.vram_used is None or self.vram_total is None:
            return None
        return self.vram_total - self.vram_used


NVML_MODULE_ENV = "ORCHD_NVML_MODULE"


def load_nvml() -> ModuleType:
    """``pynvml``, or the module ``$ORCHD_NVML_MODULE`` names (a test/demo hook; see above).

    Raises ImportError when the module is missing; callers treat that as "no NVML"."""
    name = os.environ.get(NVML_MODULE_ENV, "").strip()
    if name:
        log.warning("NVML replaced by a test/demo module", module=name, env=NVML_MODULE_ENV)
        return importlib.import_module(name)
    import pynvml

    return pynvml


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlCollector(Collector):
    def __init__(
        self,
        replicas: Sequence[Replica] = (),
        *,
        nvml: ModuleType | None = None,
        interval_s: float = 1.0,
        idle_after_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.replicas = list(replicas)
        self.interval_s = interval_s
        self.idle_after_s = idle_after_s
        self.clock = clock
        self.versions: dict[str, str] = {}
        self.driver_version = ""
        self.available = False
        self.asleep = False  # the sampler is idle (nobody read for idle_after_s)
        self._nvml = nvml
        self._handles: list[Any] = []
        self._samples: tuple[DeviceSample, ...] = ()
        self._sampled_at = float("-inf")
        self._last_read = clock()
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self._init()

    # ------------------------------------------------------------ setup

    def _init(self) -> None:
        try:
            if self._nvml is None:
                self._nvml = load_nvml()
            nv = self._nvml
            nv.nvmlInit()
            count = nv.nvmlDeviceGetCount()
            self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            self.driver_version = _text(nv.nvmlSystemGetDriverVersion())
        except Exception as e:  # NVMLError (no driver/GPU) or no library at all
            log.info("NVML unavailable: GPU metrics are off, orchd runs on", reason=str(e))
            return
        if not self._handles:
            log.info("NVML found no GPU: GPU metrics are off, orchd runs on")
            return
        self.available = True
        self._sample_now()
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.available and self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception as e:
                log.debug("nvmlShutdown failed", error=str(e))
            self.available = False

    def set_engine_version(self, replica_id: str, version: str) -> None:
        self.versions[replica_id] = version

    # ------------------------------------------------------------ sampling

    def _run(self) -> None:
        while not self._closed.is_set():
            if self._idle():
                self._wake.clear()
                if self._idle():
                    self.asleep = True
                    self._wake.wait()  # nobody reads: sleep until someone does
                    self.asleep = False
                if self._closed.is_set():
                    return
            self._sample_now()
            self._closed.wait(self.interval_s)

    def _idle(self) -> bool:
        return self.clock() - self._last_read > self.idle_after_s

    def _sample_now(self) -> None:
        self._samples = tuple(self._sample(i, h) for i, h in enumerate(self._handles))
        self._sampled_at = self.clock()

    def _fresh(self) -> tuple[DeviceSample, ...]:
        """The latest samples, or none if they are stale (the sampler was idle: it wakes now,
        and the next read has fresh ones; an old reading is not served as current)."""
        self._last_read = self.clock()
        if not self._wake.is_set():
            self._wake.set()
        if self.clock() - self._sampled_at > max(5 * self.interval_s, 5.0):
            return ()
        return self._samples

    def _sample(self, index: int, h: Any) -> DeviceSample:
        nv = self._nvml
        assert nv is not None

        def read(fn: Callable[[], Any]) -> Any:
            try:
                return fn()
            except Exception:  # NotSupported on this device, GPU lost, ...
                return None

        util = read(lambda: nv.nvmlDeviceGetUtilizationRates(h))
        mem = read(lambda: nv.nvmlDeviceGetMemoryInfo(h))
        power_mw = read(lambda: nv.nvmlDeviceGetPowerUsage(h))
        return DeviceSample(
            index=index,
            uuid=_text(read(lambda: nv.nvmlDeviceGetUUID(h)) or ""),
            name=_text(read(lambda: nv.nvmlDeviceGetName(h)) or ""),
            utilization=util.gpu / 100.0 if util is not None else None,
            vram_used=int(mem.used) if mem is not None else None,
            vram_total=int(mem.total) if mem is not None else None,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            temperature_c=read(lambda: nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)),
            sm_clock_mhz=read(lambda: nv.nvmlDeviceGetClockInfo(h, nv.NVML_CLOCK_SM)),
        )

    def snapshot(self) -> list[DeviceSample]:
        """The latest sample of every device (about ``interval_s`` old while read)."""
        return list(self._fresh())

    # ------------------------------------------------------------ ownership

    def owners(self, sample: DeviceSample) -> dict[str, str]:
        """engine / engine_version / pool_id / replica_id of the replicas using this device."""
        owning = [r for r in self.replicas if _uses(r.devices, sample)]
        out = {}
        for label in OWNER_LABELS:
            if label == "engine_version":
                values = [self.versions.get(r.id, "") for r in owning]
            elif label == "replica_id":
                values = [r.id for r in owning]
            else:
                values = [getattr(r, label) for r in owning]
            out[label] = ",".join(dict.fromkeys(v for v in values if v))
        return out

    def free_vram_by_replica(self) -> dict[str, int]:
        """Free VRAM (bytes) summed over each replica's devices; for placement."""
        out: dict[str, int] = {}
        for s in self.snapshot():
            free = s.vram_free
            if free is None:
                continue
            for r in self.replicas:
                if _uses(r.devices, s):
                    out[r.id] = out.get(r.id, 0) + free
        return out

    # ------------------------------------------------------------ prometheus

    def describe(self) -> Iterable[Metric]:
        """Names only, so registering never calls NVML."""
        return list(self._families())

    def _families(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("gpu_utilization", "GPU busy ratio (0..1)", labels=LABELS)
        yield GaugeMetricFamily("vram_used_bytes", "GPU memory in use", labels=LABELS)
        yield GaugeMetricFamily("vram_total_bytes", "GPU memory in total", labels=LABELS)
        yield GaugeMetricFamily("gpu_power_watts", "GPU power draw", labels=LABELS)
        yield GaugeMetricFamily("gpu_temperature_celsius", "GPU core temperature", labels=LABELS)
        yield GaugeMetricFamily("gpu_sm_clock_mhz", "GPU SM clock", labels=LABELS)
        yield GaugeMetricFamily("gpu_info", "GPU identity (value 1)", labels=INFO_LABELS)

    def collect(self) -> Iterable[Metric]:
        if not self.available:
            return []
        fams = {f.name: f for f in self._families()}
        for s in self._fresh():
            own = self.owners(s)
            labels = [str(s.index), *(own[k] for k in OWNER_LABELS)]
            for name, value in (
                ("gpu_utilization", s.utilization),
                ("vram_used_bytes", s.vram_used),
                ("vram_total_bytes", s.vram_total),
                ("gpu_power_watts", s.power_w),
                ("gpu_temperature_celsius", s.temperature_c),
                ("gpu_sm_clock_mhz", s.sm_clock_mhz),
            ):
                if value is not None:
                    fams[name].add_metric(labels, float(value))
            fams["gpu_info"].add_metric([*labels, s.uuid, s.name, self.driver_version], 1.0)
        return list(fams.values())


def _uses(devices: str, sample: DeviceSample) -> bool:
    for entry in devices.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if entry.isdigit() and int(entry) == sample.index:
            return True
        if entry.startswith("GPU-") and sample.uuid.startswith(entry):
            return True
    return False
