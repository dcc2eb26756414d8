"""`megatron-rl convert-to-hf` (also tools/convert_to_hf.py): megatron_rl checkpoint -> Hugging Face folder."""
from __future__ import annotations

import argparse
import sys

NAME = "convert-to-hf"
DESCRIPTION = """\
Convert a megatron_rl checkpoint directory (a training step or the output of convert-from-hf; any TP/PP/EP/DP
layout it was saved with) into a Hugging Face folder: config.json, sharded safetensors with an index, tokenizer
files and generation_config.json, loadable by transformers and vLLM.

Runs in one CPU process without the training world, reading the checkpoint tensor by tensor: peak memory is
about one output shard (--max-shard-size) plus one tensor. Before converting anything it checks that the
config.json describes the checkpoint's model (every differing field is named), that every tensor maps to an HF
tensor of the right shape, and that no shard file is missing or truncated."""
EPILOG = """\
examples:
  megatron-rl convert-to-hf --ckpt /ckpt/run1/step_000500 --out /models/run1-step500
  python tools/convert_to_hf.py --ckpt /ckpt/run1/step_000500 --out /models/run1-step500 --dtype bfloat16
  python tools/convert_to_hf.py --ckpt CKPT --out HF --verify             # + logits parity (Megatron vs transformers)
  python tools/convert_to_hf.py --ckpt CKPT --out HF --hf-config /models/Qwen3-8B   # config/tokenizer from here

exit status: 0 on success (and parity within --tolerance with --verify), 1 when verification fails,
2 on bad input (mismatched config, incomplete checkpoint, existing output directory)."""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, metavar="DIR", help="checkpoint directory (contains megatron_rl.json and model/)")
    p.add_argument("--out", required=True, metavar="HF_DIR", help="output Hugging Face folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the written tensors (default: the checkpoint's parameter dtype)")
    p.add_argument("--hf-config", metavar="DIR", default=None,
                   help="take config.json, tokenizer and generation config from this HF folder instead of the "
                   "checkpoint's hf_config/ (it must describe the same model)")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB",
                   help="maximum size of one safetensors file in GB (default 5, like save_pretrained)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--verify", action="store_true",
                   help="after converting, compare logits of the checkpoint (Megatron, one CPU rank unless "
                   "--verify-tp/--verify-ep) with the written folder (transformers)")
    p.add_argument("--verify-tp", type=int, default=1, help="tensor parallel size for --verify (default 1)")
    p.add_argument("--verify-ep", type=int, default=1, help="expert parallel size for --verify (default 1)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| for --verify (default 1e-4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parser(subparsers) -> None:
    from megatron_rl.commands.convert_errors import command_parser

    command_parser(subparsers.add_parser, NAME, DESCRIPTION, EPILOG, configure, run,
                   help="convert a megatron_rl checkpoint to a Hugging Face folder")


def run(args) -> int:
    from megatron_rl.checkpoint.convert import convert_to_hf
    from megatron_rl.commands.convert_errors import USER_ERRORS, print_parity
    from megatron_rl.parallel.layout import ParallelLayout

    try:
        report = convert_to_hf(
            args.ckpt, args.out, dtype=args.dtype, hf_config_dir=args.hf_config,
            max_shard_bytes=int(args.max_shard_size * 1000**3), overwrite=args.overwrite,
            progress=not args.no_progress, verify=args.verify,
            verify_layout=ParallelLayout(tp=args.verify_tp, ep=args.verify_ep), tolerance=args.tolerance,
        )
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"[convert-to-hf] wrote {report.num_tensors} tensors ({report.total_bytes / 1e9:.2f} GB, {report.dtype}) in "
        f"{len(report.files)} file(s) to {report.out_dir} [{report.seconds:.1f}s]"
    )
    return print_parity("convert-to-hf", report.parity)


def main(argv: list[str] | None = None) -> int:
    from megatron_rl.commands.convert_errors import command_parser

    parser = command_parser(argparse.ArgumentParser, "convert_to_hf.py", DESCRIPTION, EPILOG, configure, run)
    return run(parser.parse_args(argv))
