"""deploy/orchd.example.toml documents every field: it must load, and say what the defaults say."""

from __future__ import annotations

from pathlib import Path

import msgspec

from orchd.config import Config, load

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "orchd.example.toml"


def test_example_config_loads_and_matches_the_defaults() -> None:
    cfg = load(str(EXAMPLE), env={})
    default = Config()
    for section in ("server", "limits", "scheduling", "sessions", "catalog", "artifacts"):
        assert msgspec.to_builtins(getattr(cfg, section)) == msgspec.to_builtins(
            getattr(default, section)
        ), section
    assert [r.id for r in cfg.replicas] == ["r0", "r1"]
    assert cfg.replicas[0].mock == default.replicas[0].mock
