#!/usr/bin/env python
"""Alias of `python tools/benchmark.py cp` (same options); kept so existing references keep working.

    python tools/bench_cp_reduction.py                 # byte table + gloo timing
    python tools/bench_cp_reduction.py --no-timing     # byte table only
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["cp", *sys.argv[1:]]))
