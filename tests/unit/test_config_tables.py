"""orchd/config.py names every choice as a Literal; each implementation table, where its
implementations live, must hold exactly those names (so a config that loads can be served)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import get_args

import pytest

from engine_procs.adapters import ADAPTERS, adapter_class
from engine_procs.adapters.base import EngineAdapter
from orchd import log
from orchd.config import (
    CHAT_ADAPTERS,
    DEFAULT_ADAPTER,
    EMBEDDING_ADAPTERS,
    AdapterName,
    ArtifactStoreName,
    Engine,
    LogLevel,
    PlacementPolicy,
    QueuePolicy,
    Replica,
)
from orchd.core.placement import POLICIES
from orchd.core.queue import QUEUE_POLICIES
from orchd.scheduler.stores import STORES

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("names", "table"),
    [
        (AdapterName, ADAPTERS),
        (Engine, DEFAULT_ADAPTER),
        (PlacementPolicy, POLICIES),
        (QueuePolicy, QUEUE_POLICIES),
        (ArtifactStoreName, STORES),
        (LogLevel, log._LEVELS),  # the levels orchd.log knows
    ],
    ids=["adapters", "engines", "placement", "queue", "stores", "log-levels"],
)
def test_table_holds_exactly_the_names_config_accepts(names: object, table: dict) -> None:
    assert set(get_args(names)) == set(table)


def test_every_engine_defaults_to_a_known_adapter() -> None:
    assert set(DEFAULT_ADAPTER.values()) <= set(get_args(AdapterName))
    for engine in get_args(Engine):
        assert Replica(id="r", engine=engine).adapter_name == DEFAULT_ADAPTER[engine]
    assert Replica(id="r", engine="vllm", adapter="tgi").adapter_name == "tgi"


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_every_adapter_resolves_to_an_engine_adapter(name: str) -> None:
    cls = adapter_class(name)
    assert issubclass(cls, EngineAdapter)
    assert cls.name == name


def test_chat_and_embedding_tables_say_what_the_adapters_say() -> None:
    """Admission reads the config's tables; each adapter's own flags must agree with them."""
    classes = {name: adapter_class(name) for name in ADAPTERS}
    chat = {name for name, cls in classes.items() if cls.chat}
    embeddings = {name for name, cls in classes.items() if cls.embeddings}
    assert chat == CHAT_ADAPTERS
    assert embeddings == EMBEDDING_ADAPTERS


def test_unknown_adapter_name_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown engine adapter 'grpc'"):
        adapter_class("grpc")


# Import every adapter in a fresh interpreter where torch and transformers cannot be imported:
# only the torch engine's own process needs them.
NO_TORCH = r"""
import importlib.abc, json, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None

sys.meta_path.insert(0, Absent())
from engine_procs.adapters import ADAPTERS, adapter_class
from engine_procs.adapters.base import EngineAdapter
print(json.dumps({n: issubclass(adapter_class(n), EngineAdapter) for n in ADAPTERS}))
"""


def test_adapters_import_without_torch() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", NO_TORCH], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == dict.fromkeys(ADAPTERS, True)
