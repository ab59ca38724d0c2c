"""Benchmark runner: `python -m experiments.bench --help`.

timing.py (events, repeats, memory, header), ops.py (operator cases, providers, correctness guard,
FLOP/byte formulas), layers.py (layer cases), child.py (one case in a fresh process), report.py
(tables, JSON, plots, targets), __main__.py (the CLI).
"""
