"""Engine adapters, picked by name from ``ADAPTERS`` (as uvicorn picks its protocols).

The names are ``orchd.config.AdapterName``; the config names adapters without importing them,
and tests/unit/test_config_tables.py holds this table to that list."""

from __future__ import annotations

import importlib

from engine_procs.adapters.base import EngineAdapter

ADAPTERS: dict[str, str] = {
    "mock": "engine_procs.adapters.mock:MockAdapter",
    "openai": "engine_procs.adapters.openai:OpenAIAdapter",
    "llamacpp": "engine_procs.adapters.llamacpp:LlamaCppAdapter",
    "tgi": "engine_procs.adapters.tgi:TgiAdapter",
    "triton": "engine_procs.adapters.triton:TritonAdapter",
    "torch": "engine_procs.adapters.torch:TorchAdapter",
}


def adapter_class(name: str) -> type[EngineAdapter]:
    try:
        target = ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown engine adapter {name!r}; known: {sorted(ADAPTERS)}") from None
    module, _, attr = target.partition(":")
    cls: type[EngineAdapter] = getattr(importlib.import_module(module), attr)
    return cls
