"""Benchmarks (not part of the library): serving latency under load and offline costs."""
