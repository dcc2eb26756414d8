"""`megatron-rl`: the command-line entry point. Each subcommand lives in megatron_rl/commands/<name>.py and
registers itself through `add_parser(subparsers)`; heavy imports happen only inside the command that needs them,
so `megatron-rl --help` is instant."""
from __future__ import annotations

import argparse
import importlib
from typing import NoReturn

from megatron_rl.process_exit import exit_process

# subcommand name -> module under megatron_rl.commands
COMMANDS = {
    "train": "train",
    "eval": "eval",
    "verify-model": "verify_model",
    "convert-to-hf": "convert_to_hf",
    "convert-from-hf": "convert_from_hf",
    "replay-step": "replay_step",
}

DESCRIPTION = """\
megatron_rl: RLVR training (LUSPO, LSPO, GSPO, DAPO, GRPO) of Qwen models with Megatron-Core actors
and a vLLM rollout pool.

Run `megatron-rl <command> --help` for the options of a command."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megatron-rl", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="<command>")
    for module in COMMANDS.values():
        importlib.import_module(f"megatron_rl.commands.{module}").add_parser(subparsers)
    return parser


def _version() -> str:
    from megatron_rl import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # key=value overrides after a flag (`train --resume a.b=1`): argparse leaves them here
        if hasattr(args, "overrides") and all("=" in u and not u.startswith("-") for u in unknown):
            args.overrides = [*args.overrides, *unknown]
        else:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.print_help()
        return 0
    return int(args.run(args) or 0)


def entry() -> NoReturn:
    """The `megatron-rl` console script (setup.py) and `python -m megatron_rl.cli`."""
    exit_process(main())


if __name__ == "__main__":
    entry()
