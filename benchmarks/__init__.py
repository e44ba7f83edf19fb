"""Benchmarks for optaxclip: step time, compile time and memory against Optax.

Run ``python -m benchmarks`` (about 15 minutes on 2 CPU cores) or
``python -m benchmarks --quick`` (about a minute). Results go to
``benchmarks/results/``: ``results.json`` (every measurement), ``results.md`` (the
tables) and PNG plots. Every comparison is a ratio measured within one run, with the
candidates interleaved, so that a busy machine slows them alike; the tables report
medians over repeats.
"""
