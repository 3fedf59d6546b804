"""Benchmarks: `python -m bench NAME` prints a table of figures (see bench/README.md)."""
