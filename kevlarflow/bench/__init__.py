"""Benchmark helpers shared by bench/*.py and the CLI."""
