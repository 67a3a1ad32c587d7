"""``gpus = "auto"`` against a fake NVML module."""

from __future__ import annotations

from types import SimpleNamespace

from orchd.config import Config, Replica, Server
from orchd.telemetry.gpus import count_gpus, expand_gpus


def fake_nvml(n: int, fail: bool = False) -> SimpleNamespace:
    calls: list[str] = []

    def init() -> None:
        calls.append("init")
        if fail:
            raise RuntimeError("Driver Not Loaded")

    return SimpleNamespace(
        nvmlInit=init,
        nvmlDeviceGetCount=lambda: n,
        nvmlShutdown=lambda: calls.append("shutdown"),
        calls=calls,
    )


def test_one_replica_per_gpu_cloned_from_the_template() -> None:
    template = Replica(id="t", pool_id="big", engine="llamacpp", slots=4)
    cfg = Config(server=Server(gpus="auto"), replicas=[template])
    out = expand_gpus(cfg, fake_nvml(3))  # type: ignore[arg-type]
    assert [(r.id, r.devices, r.pool_id, r.engine, r.slots) for r in out.replicas] == [
        ("gpu0", "0", "big", "llamacpp", 4),
        ("gpu1", "1", "big", "llamacpp", 4),
        ("gpu2", "2", "big", "llamacpp", 4),
    ]


def test_no_gpu_keeps_the_configured_replicas() -> None:
    cfg = Config(server=Server(gpus="auto"))
    assert expand_gpus(cfg, fake_nvml(0, fail=True)).replicas == cfg.replicas  # type: ignore[arg-type]
    nv = fake_nvml(2)
    assert count_gpus(nv) == 2 and nv.calls == ["init", "shutdown"]  # type: ignore[arg-type]


def test_without_auto_nothing_changes() -> None:
    cfg = Config()
    assert expand_gpus(cfg, fake_nvml(8)) is cfg  # type: ignore[arg-type]
