"""What the convert-to-hf / convert-from-hf commands share: their parser set-up (as `megatron-rl` subcommands and as
the tools/convert_*.py scripts), what they treat as bad input (exit 2), and their parity line."""
from __future__ import annotations

import argparse
from typing import Callable

from megatron_rl.checkpoint.dcp_reader import DistCheckpointError
from megatron_rl.checkpoint.format import CheckpointFormatError
from megatron_rl.models.hf_io import CheckpointError
from megatron_rl.models.qwen_arch import ModelConfigError
from megatron_rl.parallel.layout import ParallelLayoutError

# ModelConfigError, CheckpointError, DistCheckpointError, CheckpointFormatError and ParallelLayoutError are
# ValueErrors; FileExistsError/FileNotFoundError name the path.
USER_ERRORS = (
    ModelConfigError, CheckpointError, DistCheckpointError, CheckpointFormatError, ParallelLayoutError,
    FileExistsError, FileNotFoundError, ValueError,
)


def print_parity(command: str, parity) -> int:
    """Print the --verify verdict (if any); return the exit status (0 ok / not verified, 1 failed)."""
    if parity is None:
        return 0
    verdict = "PASS" if parity.ok else "FAIL"
    print(
        f"[{command}] verify {verdict}  layout: {parity.layout}  tokens: {parity.num_tokens}  max|dlogit|: "
        f"{parity.max_abs_diff:.3e} (tolerance {parity.tolerance:.0e}, max|logit| {parity.max_abs_logit:.2f})  "
        f"input: {parity.input_source}"
    )
    return 0 if parity.ok else 1


def command_parser(
    factory: Callable[..., argparse.ArgumentParser], name: str, description: str, epilog: str,
    configure: Callable[[argparse.ArgumentParser], None], run: Callable[[argparse.Namespace], int], **kwargs,
) -> argparse.ArgumentParser:
    """The parser of one convert command: `factory` is `subparsers.add_parser` (name: the subcommand) or
    `argparse.ArgumentParser` (name: the script shown in --help); `run` is stored as the `run` default."""
    parser = factory(name, description=description, epilog=epilog, formatter_class=argparse.RawDescriptionHelpFormatter,
                     **kwargs)
    configure(parser)
    parser.set_defaults(run=run)
    return parser
