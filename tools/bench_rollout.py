#!/usr/bin/env python
"""Alias of `python tools/benchmark.py rollout` and `python tools/benchmark.py sync`; kept so existing references
keep working. Without --only it runs both with their default settings; with --only, the remaining options go to
that subcommand (see `tools/benchmark.py rollout --help` / `sync --help`).

    python tools/bench_rollout.py                                    # rollout, then sync
    python tools/bench_rollout.py --only sync --sizes tiny,medium
    python tools/bench_rollout.py --only throughput --batch-sizes 32 --max-tokens 64 --repeats 2
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchmark import main  # noqa: E402

SUBCOMMANDS = {"throughput": "rollout", "rollout": "rollout", "sync": "sync"}


def alias(argv: list[str]) -> int:
    if argv[:1] == ["--only"] and len(argv) >= 2 and argv[1] in SUBCOMMANDS:
        return main([SUBCOMMANDS[argv[1]], *argv[2:]])
    if argv:
        sys.exit("usage: bench_rollout.py [--only throughput|sync [options of tools/benchmark.py rollout|sync]]")
    return main(["rollout"]) or main(["sync"])


if __name__ == "__main__":
    sys.exit(alias(sys.argv[1:]))
