"""The scheduler's I/O beside the loop: the artifact store and the catalog's on-disk index
(model digests: orchd/scheduler/models.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

from orchd import log
from orchd.artifacts import ArtifactStore, FsStore, MemoryStore, write_atomic
from orchd.config import Artifacts, Config
from orchd.core.catalog import Catalog


def _memory(a: Artifacts, run_dir: str) -> ArtifactStore:
    return MemoryStore(a.artifact_memory_bytes)


def _fs(a: Artifacts, run_dir: str) -> ArtifactStore:
    return FsStore(a.artifact_dir or os.path.join(run_dir, "artifacts"))


# Keyed by the names orchd.config.ArtifactStoreName accepts (tests/unit/test_config_tables.py).
STORES: dict[str, Callable[[Artifacts, str], ArtifactStore]] = {"memory": _memory, "fs": _fs}


def make_store(cfg: Config, run_dir: str) -> ArtifactStore:
    return STORES[cfg.artifacts.artifact_store](cfg.artifacts, run_dir)


class CatalogDisk:
    """Loads the catalog at start and rewrites its index atomically after every change."""

    def __init__(self, catalog: Catalog, directory: str) -> None:
        self.catalog = catalog
        self.path = os.path.join(directory, "catalog.json") if directory else ""
        if self.path and os.path.exists(self.path):
            with open(self.path, "rb") as f:
                catalog.restore(json.loads(f.read()))
            log.info("catalog loaded", models=len(catalog.models), path=self.path)

    def save(self) -> None:
        if self.path:
            write_atomic(self.path, json.dumps(self.catalog.snapshot(), indent=1).encode())
