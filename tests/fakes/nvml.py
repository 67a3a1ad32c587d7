"""A fake NVML: the slice of ``pynvml`` (package ``nvidia-ml-py``) that orchd's telemetry uses,
with two GPUs whose load moves with time. For tests and demos on machines without a GPU.

Test/demo hook: ``ORCHD_NVML_MODULE=tests.fakes.nvml`` makes orchd import this module instead of
``pynvml`` (see :func:`orchd.telemetry.nvml.load_nvml`); ``/metrics`` then shows
``gpu_utilization``, ``vram_used_bytes``, ... for two devices, and ``--gpus auto`` finds two.
Never set it in production: every figure here is invented.

It behaves as NVML's reference (https://docs.nvidia.com/deploy/nvml-api/) says the real calls
do, function by function (each docstring names the one it mimics):

- ``nvmlInit`` is reference-counted; ``nvmlShutdown`` without an open init raises
  ``NVML_ERROR_UNINITIALIZED``, and so does every query made before ``nvmlInit``
  (group__nvmlInitializationAndCleanup.html, group__nvmlErrorReporting.html).
- A bad device index, sensor or clock type raises ``NVML_ERROR_INVALID_ARGUMENT``.
- Units as NVML reports them: utilization in percent over the last sample period, memory in
  bytes (``used + free == total`` for the v1 struct), power in milliwatts, temperature in
  degrees C, clocks in MHz.
- Errors are :class:`NVMLError` with ``.value`` the NVML return code and one subclass per code
  (``NVMLError_Uninitialized``, ...), as pynvml raises them; strings come back as ``str``, as
  pynvml >= 11.5 returns them.

The load: device ``i`` follows a sine of period :data:`PERIOD_S` seconds of ``clock()`` (wall
time by default, so every process reading it agrees), phase-shifted per device. Utilization
drives power, temperature, SM clock and VRAM in use. Tests may pin the clock with
:func:`set_clock`.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Return codes (nvmlReturn_t), the values pynvml exports.
NVML_SUCCESS = 0
NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3

# nvmlTemperatureSensors_t and nvmlClockType_t.
NVML_TEMPERATURE_GPU = 0
NVML_CLOCK_GRAPHICS = 0
NVML_CLOCK_SM = 1
NVML_CLOCK_MEM = 2
NVML_CLOCK_VIDEO = 3

PERIOD_S = 60.0
GiB = 1 << 30
DRIVER_VERSION = "550.54.15"


class NVMLError(Exception):
    """pynvml's exception: ``value`` is the nvmlReturn_t code; str() is nvmlErrorString()."""

    STRINGS = {
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_INVALID_ARGUMENT: "Invalid Argument",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
    }

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self.STRINGS.get(self.value, f"NVML Error with code {self.value}")


class NVMLError_Uninitialized(NVMLError):  # noqa: N801 (pynvml's name)
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_UNINITIALIZED)


class NVMLError_InvalidArgument(NVMLError):  # noqa: N801
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_INVALID_ARGUMENT)


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    def __init__(self) -> None:
        super().__init__(NVML_ERROR_NOT_SUPPORTED)


@dataclass(frozen=True, slots=True)
class c_nvmlUtilization_t:  # noqa: N801
    gpu: int  # percent of the sample period a kernel ran
    memory: int  # percent of the sample period device memory was read or written


@dataclass(frozen=True, slots=True)
class c_nvmlMemory_t:  # noqa: N801
    total: int
    free: int
    used: int


@dataclass(frozen=True, slots=True)
class Spec:
    """One fake device: its identity and the range its readings move in."""

    uuid: str
    name: str
    total: int  # bytes
    idle_used: int  # bytes in use at 0 % utilization
    busy_used: int  # extra bytes in use at 100 %
    idle_mw: int
    max_mw: int
    idle_c: int
    max_c: int
    base_mhz: int
    boost_mhz: int
    phase: float  # radians


DEVICES = (
    Spec("GPU-fa4e0000-0000-4000-8000-000000000000", "NVIDIA H100 80GB HBM3 (fake)",
         80 * GiB, 6 * GiB, 40 * GiB, 70_000, 700_000, 34, 78, 1095, 1980, 0.0),
    Spec("GPU-fa4e0001-0000-4000-8000-000000000001", "NVIDIA H100 80GB HBM3 (fake)",
         80 * GiB, 2 * GiB, 20 * GiB, 65_000, 700_000, 31, 72, 1095, 1980, math.pi / 2),
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Handle:
    """What nvmlDeviceGetHandleByIndex returns (an opaque nvmlDevice_t in NVML)."""

    index: int


_lock = threading.Lock()
_refcount = 0
_clock: Callable[[], float] = time.time


def set_clock(clock: Callable[[], float]) -> None:
    """Tests: read time from ``clock`` (seconds) instead of the wall clock."""
    global _clock
    _clock = clock


def _check_init() -> None:
    if _refcount <= 0:
        raise NVMLError_Uninitialized()


def _spec(handle: object) -> Spec:
    _check_init()
    if not isinstance(handle, Handle) or not 0 <= handle.index < len(DEVICES):
        raise NVMLError_InvalidArgument()
    return DEVICES[handle.index]


def _load(handle: object) -> tuple[Spec, float]:
    """The device and its load now, 0..1."""
    spec = _spec(handle)
    return spec, 0.5 + 0.45 * math.sin(2 * math.pi * _clock() / PERIOD_S + spec.phase)


def nvmlInit() -> None:
    """nvmlInit_v2: initialise; may be called again (a reference count)."""
    global _refcount
    with _lock:
        _refcount += 1


def nvmlShutdown() -> None:
    """nvmlShutdown: drop one reference; NVML_ERROR_UNINITIALIZED if none is held."""
    global _refcount
    with _lock:
        if _refcount <= 0:
            raise NVMLError_Uninitialized()
        _refcount -= 1


def nvmlSystemGetDriverVersion() -> str:
    """nvmlSystemGetDriverVersion: the driver's version string."""
    _check_init()
    return DRIVER_VERSION


def nvmlDeviceGetCount() -> int:
    """nvmlDeviceGetCount_v2: devices visible to this process."""
    _check_init()
    return len(DEVICES)


def nvmlDeviceGetHandleByIndex(index: int) -> Handle:
    """nvmlDeviceGetHandleByIndex_v2: NVML_ERROR_INVALID_ARGUMENT past the count."""
    _check_init()
    if not 0 <= index < len(DEVICES):
        raise NVMLError_InvalidArgument()
    return Handle(index)


def nvmlDeviceGetUUID(handle: Handle) -> str:
    """nvmlDeviceGetUUID: ``GPU-`` and a UUID, stable for the device."""
    return _spec(handle).uuid


def nvmlDeviceGetName(handle: Handle) -> str:
    """nvmlDeviceGetName: the product name."""
    return _spec(handle).name


def nvmlDeviceGetUtilizationRates(handle: Handle) -> c_nvmlUtilization_t:
    """nvmlDeviceGetUtilizationRates: percent busy over the last sample period."""
    _, load = _load(handle)
    return c_nvmlUtilization_t(gpu=round(100 * load), memory=round(60 * load))


def nvmlDeviceGetMemoryInfo(handle: Handle) -> c_nvmlMemory_t:
    """nvmlDeviceGetMemoryInfo (v1 struct): total, free and used bytes; used + free = total."""
    spec, load = _load(handle)
    used = spec.idle_used + int(spec.busy_used * load)
    return c_nvmlMemory_t(total=spec.total, free=spec.total - used, used=used)


def nvmlDeviceGetPowerUsage(handle: Handle) -> int:
    """nvmlDeviceGetPowerUsage: board power in milliwatts."""
    spec, load = _load(handle)
    return spec.idle_mw + int((spec.max_mw - spec.idle_mw) * load)


def nvmlDeviceGetTemperature(handle: Handle, sensor: int) -> int:
    """nvmlDeviceGetTemperature: degrees C; only NVML_TEMPERATURE_GPU exists."""
    spec, load = _load(handle)
    if sensor != NVML_TEMPERATURE_GPU:
        raise NVMLError_InvalidArgument()
    return spec.idle_c + round((spec.max_c - spec.idle_c) * load)


def nvmlDeviceGetClockInfo(handle: Handle, type: int) -> int:  # noqa: A002 (pynvml's name)
    """nvmlDeviceGetClockInfo: the current clock of a domain, MHz."""
    spec, load = _load(handle)
    if type in (NVML_CLOCK_GRAPHICS, NVML_CLOCK_SM):
        return spec.base_mhz + round((spec.boost_mhz - spec.base_mhz) * load)
    if type == NVML_CLOCK_MEM:
        return 2619
    if type == NVML_CLOCK_VIDEO:
        return 1755
    raise NVMLError_InvalidArgument()
