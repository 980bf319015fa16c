"""Benchmark harness (python -m bench): see docs/performance.md."""
