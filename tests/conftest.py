"""Tests marked ``gpu`` run only where NVML finds an NVIDIA GPU; everywhere else they are
skipped, with the reason shown in the summary. Nothing else is ever skipped."""

from __future__ import annotations

import functools
from collections.abc import Iterator

import pytest

from tests.support.sse import SyncStream

# The real llama.cpp server's fixtures (llama_server, llama_model, llama_model_b,
# llama_server_command), for any test that wants one: tests/support/llama.py.
pytest_plugins = ["tests.support.llama"]


@functools.cache
def has_gpu() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetCount()) > 0
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_tests = [item for item in items if "gpu" in item.keywords]
    if gpu_tests and not has_gpu():
        skip = pytest.mark.skip(reason="needs an NVIDIA GPU with a driver (NVML found none)")
        for item in gpu_tests:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _close_sse_streams() -> Iterator[None]:
    """Whatever SSE connection a test opened and left open is closed when it ends."""
    yield
    SyncStream.close_all()
