"""Telemetry sources outside the request path. See :mod:`orchd.telemetry.nvml` for GPUs."""

from orchd.telemetry.nvml import DeviceSample, NvmlCollector

__all__ = ["DeviceSample", "NvmlCollector"]
