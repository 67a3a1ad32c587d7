"""The scheduler's I/O beside the loop: the artifact store, the catalog's on-disk index, and
model digests computed on a worker thread (a multi-GB file must not stall scheduling)."""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
from collections.abc import Callable

from orchd import log
from orchd.artifacts import ArtifactStore, FsStore, MemoryStore, write_atomic
from orchd.config import Artifacts, Config
from orchd.core.catalog import Catalog, parse_ref


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


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


class Verifier:
    """Digests computed off the loop; results collected on the scheduler's tick."""

    def __init__(self) -> None:
        self.results: queue.SimpleQueue[tuple[str, str | None, str]] = queue.SimpleQueue()

    def start(self, model_id: str, ref: str) -> None:
        threading.Thread(target=self._run, args=(model_id, ref), daemon=True).start()

    def _run(self, model_id: str, ref: str) -> None:
        scheme, rest = parse_ref(ref)
        if scheme != "file":
            self.results.put((model_id, None, f"cannot fetch {scheme}: refs to verify them here"))
            return
        try:
            self.results.put((model_id, file_digest(rest), ""))
        except OSError as e:
            self.results.put((model_id, None, f"cannot read {rest}: {e.strerror}"))

    def done(self) -> list[tuple[str, str | None, str]]:
        out = []
        while True:
            try:
                out.append(self.results.get_nowait())
            except queue.Empty:
                return out
