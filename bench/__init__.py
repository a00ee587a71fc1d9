"""Benchmarks: naive loop vs engine (CPU, tiny), full size on a GPU, the whole service, submission."""
