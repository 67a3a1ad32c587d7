"""Benchmarks: load generator, baselines, scenarios. Not run by pytest."""
