"""``gpus = "auto"``: one replica per GPU that NVML finds, cloned from a template replica."""

from __future__ import annotations

from types import ModuleType

import msgspec

from orchd import log
from orchd.config import Config
from orchd.telemetry.nvml import load_nvml


def count_gpus(nvml: ModuleType | None = None) -> int:
    """GPUs NVML can see; 0 without a driver, a GPU or the library."""
    try:
        if nvml is None:
            nvml = load_nvml()
        nvml.nvmlInit()
        try:
            return int(nvml.nvmlDeviceGetCount())
        finally:
            nvml.nvmlShutdown()
    except Exception as e:  # NVMLError or no library at all
        log.info("NVML unavailable", reason=str(e))
        return 0


def expand_gpus(cfg: Config, nvml: ModuleType | None = None) -> Config:
    """The config with one replica per GPU when ``server.gpus == "auto"``.

    The first configured replica is the template: replica ``gpu<i>`` gets ``devices = "<i>"``
    (the launcher exports it as CUDA_VISIBLE_DEVICES to that replica's engine). With no GPU,
    the configured replicas stay as they are and a line says so."""
    if cfg.server.gpus != "auto":
        return cfg
    n = count_gpus(nvml)
    if n == 0:
        log.warning("gpus = auto but NVML found no GPU: serving the configured replicas")
        return cfg
    template = cfg.replicas[0]
    replicas = [msgspec.structs.replace(template, id=f"gpu{i}", devices=str(i)) for i in range(n)]
    log.info("gpus = auto: one replica per GPU", gpus=n, pool_id=template.pool_id)
    return msgspec.structs.replace(cfg, replicas=replicas)
