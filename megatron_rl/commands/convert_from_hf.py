"""`megatron-rl convert-from-hf` (also tools/convert_from_hf.py): Hugging Face folder -> megatron_rl checkpoint."""
from __future__ import annotations

import argparse
import sys

NAME = "convert-from-hf"
DESCRIPTION = """\
Convert a Hugging Face Qwen2 / Qwen3 / Qwen3-MoE folder into a megatron_rl checkpoint directory (Megatron
distributed checkpoint + hf_config/ + megatron_rl.json) sharded for a target parallel layout; each rank of a
later job reads only its own chunks of it (`megatron_rl.checkpoint.load_model_checkpoint`). Start training from it
with `megatron-rl train model.path=HF_DIR model.megatron_checkpoint=OUT` (model.path still gives config.json, the
tokenizer and the rollout engines' start-up weights; the checkpoint's weights replace them before the first rollout).

The layout's ranks are spawned on this machine's CPU (gloo); each builds its shard of the Megatron model, reads
only the HF tensors it needs, and all write the checkpoint together. The checkpoint loads into any other layout
as well (Megatron's distributed checkpoints reshard on load); the target layout only decides how it is chunked
on disk. config.json is validated against the safetensors (names and shapes) before anything is built."""
EPILOG = """\
examples:
  megatron-rl convert-from-hf --hf /models/Qwen2.5-7B --out /ckpt/qwen25-7b-tp2 --tp 2
  python tools/convert_from_hf.py --hf /models/Qwen3-30B-A3B --out /ckpt/q3moe --tp 2 --ep 4 --dtype bfloat16
  python tools/convert_from_hf.py --hf HF --out CKPT --tp 2 --verify       # + logits parity after saving
  megatron-rl train --config my.yaml model.path=HF model.megatron_checkpoint=CKPT   # train from it

exit status: 0 on success (and parity within --tolerance with --verify), 1 when verification fails,
2 on bad input (inconsistent HF folder, layout that does not fit the model, existing output directory)."""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--hf", required=True, metavar="HF_DIR", help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, metavar="DIR", help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size of the target layout")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size of the target layout")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size of the target layout (MoE)")
    p.add_argument("--etp", type=int, default=1, help="tensor parallel size inside experts (MoE, default 1)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter dtype of the checkpoint (default: config.json's dtype)")
    p.add_argument("--world-size", type=int, default=None,
                   help="number of ranks to spawn (default: the smallest that fits the layout)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--verify", action="store_true",
                   help="after saving, load the checkpoint into a fresh model and compare its logits with transformers")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max |logit difference| for --verify (default 1e-4)")


def add_parser(subparsers) -> None:
    from megatron_rl.commands.convert_errors import command_parser

    command_parser(subparsers.add_parser, NAME, DESCRIPTION, EPILOG, configure, run,
                   help="convert a Hugging Face folder to a megatron_rl checkpoint")


def run(args) -> int:
    from megatron_rl.checkpoint.convert import convert_from_hf
    from megatron_rl.commands.convert_errors import USER_ERRORS, print_parity
    from megatron_rl.parallel.layout import ParallelLayout

    try:
        layout = ParallelLayout(tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp, vpp=args.vpp)
        print(f"[convert-from-hf] {args.hf} -> {args.out} in layout {layout} ...", flush=True)
        report = convert_from_hf(
            args.hf, args.out, layout, dtype=args.dtype, world_size=args.world_size, overwrite=args.overwrite,
            verify=args.verify, tolerance=args.tolerance,
        )
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"[convert-from-hf] wrote a {report.dtype} checkpoint ({report.num_tensors} sharded tensors, "
        f"{report.total_bytes / 1e9:.2f} GB) to {report.out_dir} [{report.seconds:.1f}s]"
    )
    return print_parity("convert-from-hf", report.parity)


def main(argv: list[str] | None = None) -> int:
    from megatron_rl.commands.convert_errors import command_parser

    parser = command_parser(argparse.ArgumentParser, "convert_from_hf.py", DESCRIPTION, EPILOG, configure, run)
    return run(parser.parse_args(argv))
