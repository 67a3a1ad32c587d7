"""orchd: an LLM inference orchestrator for GPU hosts."""

__version__ = "0.1.0"
