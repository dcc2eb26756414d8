"""`megatron-rl verify-model`: Megatron vs transformers logits on an HF folder, in a chosen parallel layout."""
from __future__ import annotations

import argparse
import sys
import tempfile
import time

EPILOG = """\
examples:
  megatron-rl verify-model --hf /ckpt/Qwen3-0.6B --tp 2
  megatron-rl verify-model --hf /ckpt/Qwen3-30B-A3B-tiny --tp 2 --ep 2 --pp 2
  megatron-rl verify-model --tiny qwen3_moe --tp 2 --ep 2      # a random tiny model, no files needed

The ranks are spawned on this machine's CPU (gloo); the world size is the smallest that fits the layout
unless --world-size says otherwise. Exit status: 0 when max |logit difference| <= --tolerance and the
exported weights equal the HF tensors bit for bit, 1 otherwise, 2 on bad input."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "verify-model",
        help="check a checkpoint: Megatron (TP/PP/EP) logits vs transformers",
        description="Build the Megatron model from a Hugging Face folder in the given parallel layout, compare "
        "its logits with transformers on a fixed prompt (fp32), and check that exporting the loaded shards "
        "reproduces every HF tensor exactly.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--hf", metavar="DIR", help="Hugging Face model folder (config.json + safetensors)")
    src.add_argument("--tiny", choices=("qwen2", "qwen3", "qwen3_moe"), default=None,
                     help="verify a freshly made random tiny model of this architecture (default: qwen3_moe)")
    p.add_argument("--tp", type=int, default=1, help="tensor parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline parallel size")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    p.add_argument("--ep", type=int, default=1, help="expert parallel size (MoE)")
    p.add_argument("--etp", type=int, default=1, help="tensor parallel size inside experts (MoE)")
    p.add_argument("--world-size", type=int, default=None, help="number of ranks (default: smallest that fits)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="max allowed |logit difference| (default 1e-4)")
    p.add_argument("--prompt", default=None,
                   help="text to run (default: a fixed arithmetic sentence; a folder without tokenizer files is "
                   "checked on 32 fixed token ids instead)")
    p.add_argument("--no-export-check", action="store_true", help="skip the export(import(hf)) == hf check")
    p.set_defaults(run=run)


def run(args) -> int:
    from megatron_rl.models.hf_io import CheckpointError
    from megatron_rl.models.qwen_arch import ModelConfigError
    from megatron_rl.models.verify import verify_model
    from megatron_rl.parallel.layout import ParallelLayout, ParallelLayoutError

    try:
        layout = ParallelLayout(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp)
    except ParallelLayoutError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="megatron_rl_tiny_") as tmp:
        hf_dir = args.hf
        if hf_dir is None:
            from megatron_rl.models.tiny import TinySize, make_tiny_model

            arch = args.tiny or "qwen3_moe"
            layers = max(2, args.pp * (args.vpp or 1))
            print(f"[verify-model] making a random tiny {arch} model ({layers} layers) in {tmp}", flush=True)
            hf_dir = make_tiny_model(arch, tmp, size=TinySize(num_layers=layers, initializer_range=0.2))
        print(f"[verify-model] {hf_dir}: building the Megatron model in layout {layout} ...", flush=True)
        start = time.monotonic()
        try:
            report = verify_model(
                hf_dir, layout, world_size=args.world_size, tolerance=args.tolerance,
                prompt=args.prompt, check_export=not args.no_export_check,
            )
        except (ModelConfigError, CheckpointError, ParallelLayoutError, FileNotFoundError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    verdict = "PASS" if report.ok else "FAIL"
    export = {True: "bit-exact", False: "MISMATCH", None: "skipped"}[report.export_bitexact]
    print(
        f"[verify-model] {verdict}  layout: {report.layout} ({report.world_size} ranks)  tokens: {report.num_tokens}  "
        f"max|dlogit|: {report.max_abs_diff:.3e} (tolerance {report.tolerance:.0e}, max|logit| "
        f"{report.max_abs_logit:.2f})  export: {export}  input: {report.input_source}  [{time.monotonic() - start:.1f}s]"
    )
    return 0 if report.ok else 1
