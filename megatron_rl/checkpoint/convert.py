"""Convert between Hugging Face folders and megatron_rl checkpoint directories, with built-in validation.

- `convert_to_hf(ckpt_dir, out_dir)`: runs in one CPU process without a training world. It reads the checkpoint's
  DCP files tensor by tensor (`DistCheckpointReader`), maps Megatron keys to canonical names
  (`sharded_keys`), splits each canonical tensor into HF tensors (`weight_mapping.megatron_to_hf`) and streams
  them into size-bounded safetensors shards (`hf_io.write_hf_safetensors`): peak memory is about one output
  shard plus one tensor, whatever the model size. Any layout the checkpoint was saved with reads the same way.
- `convert_from_hf(hf_dir, out_dir, layout)`: spawns the layout's ranks on CPU (gloo), builds the sharded model,
  loads the HF weights (each rank reads only the tensors of its own layers and experts, whole, and keeps its TP
  slice) and saves a checkpoint with `save_model_checkpoint`.

Validation, all before any tensor is converted: the HF config.json is checked against the checkpoint's recorded
architecture (every differing field is named), every checkpoint tensor must map to an HF tensor with the shape
the config implies and every HF tensor must be present (nothing dropped, nothing invented), and the data files
must exist and be complete. `verify=True` additionally runs a forward pass on both sides (Megatron loading the
checkpoint, transformers loading the HF folder) and compares logits (`megatron_rl.models.verify`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from megatron_rl.checkpoint.dcp_reader import DistCheckpointError, DistCheckpointReader
from megatron_rl.checkpoint.format import (
    CheckpointFormatError,
    CheckpointInfo,
    check_arch_matches,
    copy_hf_side_files,
    hf_side_files,
    read_info,
)
from megatron_rl.checkpoint.names import HF_CONFIG_DIR, MODEL_DIR
from megatron_rl.checkpoint.model_ckpt import atomic_checkpoint_dir
from megatron_rl.checkpoint.sharded_keys import CanonicalSource, canonical_sources
from megatron_rl.models.hf_io import HFCheckpointReader, expected_hf_shape, write_hf_safetensors
from megatron_rl.models.qwen_arch import QwenArch, load_arch
from megatron_rl.models.verify import verification_ids
from megatron_rl.models.weight_mapping import TensorMapping, all_mappings, megatron_to_hf
from megatron_rl.parallel.layout import ParallelLayout

OUTPUT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_DTYPES = ("float32", "bfloat16")  # what the Megatron model can be built in (models/builder.py)
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3  # the shard size transformers' save_pretrained uses ("5GB")


# ------------------------------------------------------------------------------------------------------------
# Megatron checkpoint -> HF
# ------------------------------------------------------------------------------------------------------------
def _refuse_existing(out_dir: str, overwrite: bool) -> None:
    """Checked before any expensive work (atomic_checkpoint_dir checks again when it creates the directory)."""
    if os.path.lexists(out_dir) and not overwrite:
        raise FileExistsError(f"{out_dir} already exists; choose a new output directory or overwrite it (--overwrite)")


def expected_megatron_shape(mapping: TensorMapping, arch: QwenArch) -> tuple[int, ...]:
    """Full shape of a canonical Megatron tensor (q/k/v and gate/up are concatenated along dim 0)."""
    shapes = [expected_hf_shape(name, arch) for name in mapping.hf_names]
    return (sum(s[0] for s in shapes),) + tuple(shapes[0][1:])


def plan_hf_export(reader: DistCheckpointReader, arch: QwenArch) -> list[tuple[TensorMapping, CanonicalSource]]:
    """Pair every HF-bound tensor of `arch` with its place in the checkpoint; refuse any mismatch."""
    sources = canonical_sources(reader.tensors())
    plan, missing, wrong_shape = [], [], []
    for mapping in all_mappings(arch):
        source = sources.pop(mapping.megatron_name, None)
        if source is None:
            missing.append(mapping.megatron_name)
            continue
        want = expected_megatron_shape(mapping, arch)
        if source.shape != want:
            wrong_shape.append(f"{mapping.megatron_name}: checkpoint {source.shape}, config.json implies {want}")
        plan.append((mapping, source))
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensor(s) the config needs are not in the checkpoint, e.g. {missing[:5]}")
    if wrong_shape:
        problems.append(f"{len(wrong_shape)} tensor(s) have the wrong shape, e.g.:\n    " + "\n    ".join(wrong_shape[:5]))
    if sources:
        extra = sorted(sources)
        problems.append(f"{len(extra)} checkpoint tensor(s) are not explained by the config, e.g. {extra[:5]}")
    if problems:
        raise DistCheckpointError(
            f"the checkpoint {reader.path} does not match config.json ({arch.model_type}, {arch.num_layers} layers):\n  "
            + "\n  ".join(problems)
        )
    return plan


def _read_canonical(reader: DistCheckpointReader, source: CanonicalSource) -> torch.Tensor:
    parts = [reader.read(part.key, part.index) for part in source.parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def iter_hf_tensors(
    reader: DistCheckpointReader,
    plan: list[tuple[TensorMapping, CanonicalSource]],
    arch: QwenArch,
    dtype: torch.dtype | None = None,
    progress=None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) for the plan, reading one canonical tensor at a time."""
    for mapping, source in plan:
        full = _read_canonical(reader, source)
        for name, tensor in megatron_to_hf(mapping, full, arch):
            tensor = tensor if dtype is None else tensor.to(dtype)
            if progress is not None:
                progress(tensor.numel() * tensor.element_size())
            yield name, tensor
        del full


@dataclass
class ConversionReport:
    out_dir: str
    num_tensors: int
    total_bytes: int
    files: list[str]
    dtype: str
    seconds: float
    parity: object | None = None  # models.verify.ParityReport when verified

    @property
    def ok(self) -> bool:
        return self.parity is None or self.parity.ok


def _hf_config_with_dtype(config_dir: str, dtype: str) -> dict:
    with open(os.path.join(config_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
    if "dtype" in config or "torch_dtype" not in config:
        config["dtype"] = dtype
    return config


def convert_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    hf_config_dir: str | os.PathLike | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    progress: bool = True,
    verify: bool = False,
    verify_layout: ParallelLayout | None = None,
    tolerance: float = 1e-4,
) -> ConversionReport:
    """Write an HF folder (config, tokenizer, sharded safetensors + index) from a megatron_rl checkpoint.

    dtype: output tensor dtype ("float32", "bfloat16", "float16"; default: the checkpoint's).
    hf_config_dir: take config.json / tokenizer / generation config from this HF folder instead of the
    checkpoint's `hf_config/` (it must describe the same architecture). verify: also compare logits of the
    checkpoint (Megatron, `verify_layout`, default one rank) and the written folder (transformers).
    """
    start = time.monotonic()
    ckpt_dir, out_dir = os.path.abspath(os.fspath(ckpt_dir)), os.path.abspath(os.fspath(out_dir))
    info = read_info(ckpt_dir)
    config_dir = os.path.abspath(os.fspath(hf_config_dir)) if hf_config_dir else os.path.join(ckpt_dir, HF_CONFIG_DIR)
    if not hf_config_dir and not os.path.isfile(os.path.join(config_dir, "config.json")):
        raise CheckpointFormatError(
            f"{ckpt_dir} has no {HF_CONFIG_DIR}/config.json (saved without hf_source_dir?); pass the HF folder of the "
            "model it was trained from as hf_config_dir (--hf-config DIR)"
        )
    arch = load_arch(config_dir)
    if not any(name.startswith("tokenizer") for name in hf_side_files(config_dir)):
        warnings.warn(
            f"{config_dir} has no tokenizer files, so {out_dir} gets none: transformers and vLLM need them. Pass the "
            "original model's folder as hf_config_dir (--hf-config DIR) or copy its tokenizer files afterwards",
            stacklevel=2,
        )
    check_arch_matches(info, arch, what=f"config.json in {config_dir}")
    out_dtype = dtype or info.dtype
    if out_dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(OUTPUT_DTYPES)}, got {out_dtype!r}")
    reader = DistCheckpointReader(os.path.join(ckpt_dir, MODEL_DIR))
    reader.check_files()
    plan = plan_hf_export(reader, arch)
    _refuse_existing(out_dir, overwrite)
    element = torch.empty((), dtype=OUTPUT_DTYPES[out_dtype]).element_size()
    total = sum(torch.Size(expected_hf_shape(n, arch)).numel() * element for m, _ in plan for n in m.hf_names)
    from tqdm.auto import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc="convert_to_hf", disable=not progress) as bar:
        with atomic_checkpoint_dir(out_dir, overwrite=overwrite, collective=False) as tmp:
            tensors = iter_hf_tensors(reader, plan, arch, OUTPUT_DTYPES[out_dtype], progress=bar.update)
            files = write_hf_safetensors(tmp, tensors, max_shard_bytes=max_shard_bytes)
            copy_hf_side_files(config_dir, tmp, config=_hf_config_with_dtype(config_dir, out_dtype))
    report = ConversionReport(
        out_dir=out_dir,
        num_tensors=sum(len(m.hf_names) for m, _ in plan),
        total_bytes=total,
        files=files,
        dtype=out_dtype,
        seconds=time.monotonic() - start,
    )
    if verify:
        report.parity = verify_checkpoint(ckpt_dir, out_dir, layout=verify_layout or ParallelLayout(), tolerance=tolerance)
    return report


# ------------------------------------------------------------------------------------------------------------
# HF -> Megatron checkpoint
# ------------------------------------------------------------------------------------------------------------
def model_dtype_for(arch: QwenArch, dtype: str | None) -> str:
    """The parameter dtype to convert into: `dtype`, else the HF config's when the Megatron model supports it."""
    chosen = dtype or {"float32": "float32", "bfloat16": "bfloat16"}.get(arch.torch_dtype)
    if chosen is None:
        raise ValueError(
            f"config.json dtype is {arch.torch_dtype!r}; choose the checkpoint dtype explicitly "
            f"(--dtype {' or '.join(MODEL_DTYPES)})"
        )
    if chosen not in MODEL_DTYPES:
        raise ValueError(f"dtype must be one of {MODEL_DTYPES}, got {chosen!r}")
    return chosen


def _from_hf_rank(hf_dir, out_dir, layout_fields, dtype, overwrite, input_ids, rounding):
    from megatron_rl.checkpoint.model_ckpt import save_model_checkpoint
    from megatron_rl.models.builder import build_model_chunks, transformer_config
    from megatron_rl.models.weight_transfer import load_hf_weights
    from megatron_rl.parallel.state import destroy_parallel, initialize_parallel

    layout = ParallelLayout(**layout_fields)
    arch = load_arch(hf_dir)
    initialize_parallel(layout)
    chunks = build_model_chunks(arch, transformer_config(arch, layout, dtype=dtype))
    load_hf_weights(chunks, arch, HFCheckpointReader(hf_dir))
    save_model_checkpoint(chunks, arch, layout, out_dir, hf_source_dir=hf_dir, overwrite=overwrite)
    del chunks
    logits = _checkpoint_logits(out_dir, arch, layout, input_ids, rounding) if input_ids is not None else None
    destroy_parallel()
    return logits


def convert_from_hf(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    layout: ParallelLayout,
    *,
    dtype: str | None = None,
    world_size: int | None = None,
    overwrite: bool = False,
    verify: bool = False,
    tolerance: float = 1e-4,
    timeout: float = 3600.0,
) -> ConversionReport:
    """Write a megatron_rl checkpoint of the HF folder, sharded for `layout` (ranks spawned on this CPU).

    dtype: parameter dtype of the checkpoint ("float32" or "bfloat16"; default: config.json's).
    verify: after saving, load the checkpoint into a fresh model in the same layout and compare its logits with
    transformers on the HF folder.
    """
    from megatron_rl.models.verify import minimal_world_size
    from megatron_rl.parallel.spawn import spawn_ranks

    start = time.monotonic()
    hf_dir, out_dir = os.path.abspath(os.fspath(hf_dir)), os.path.abspath(os.fspath(out_dir))
    arch = load_arch(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    reader.validate(arch)
    model_dtype = model_dtype_for(arch, dtype)
    world = world_size or minimal_world_size(layout)
    layout.validate(world, arch)
    _refuse_existing(out_dir, overwrite)
    input_ids, input_source = verification_ids(hf_dir, arch.vocab_size) if verify else (None, None)
    rounding = comparison_dtype(model_dtype, arch.torch_dtype)
    results = spawn_ranks(
        _from_hf_rank, world,
        args=(hf_dir, out_dir, dataclasses.asdict(layout), model_dtype, overwrite, input_ids, rounding),
        timeout=timeout,
    )
    info = read_info(out_dir)
    files = sorted(os.listdir(os.path.join(out_dir, MODEL_DIR)))
    total = sum(
        os.path.getsize(os.path.join(out_dir, MODEL_DIR, f)) for f in files if f.endswith(".distcp")
    )
    report = ConversionReport(
        out_dir=out_dir, num_tensors=len(DistCheckpointReader(os.path.join(out_dir, MODEL_DIR)).tensors()),
        total_bytes=total, files=files, dtype=info.dtype, seconds=time.monotonic() - start,
    )
    if verify:
        logits = next(r for r in results if r is not None)
        report.parity = _parity(logits, hf_dir, input_ids, input_source, layout.describe(world), world, tolerance,
                                rounding)
    return report


# ------------------------------------------------------------------------------------------------------------
# Logit parity of a checkpoint and an HF folder
# ------------------------------------------------------------------------------------------------------------
def _checkpoint_logits(ckpt_dir: str, arch: QwenArch, layout: ParallelLayout, input_ids: torch.Tensor, rounding):
    """On live parallel groups: a fresh fp32 model loaded from the checkpoint (weights rounded to `rounding`
    when given) -> logits on the reporting rank, None elsewhere."""
    from megatron_rl.checkpoint.model_ckpt import load_model_checkpoint
    from megatron_rl.models.builder import build_model_chunks, transformer_config
    from megatron_rl.models.verify import is_logits_reporter, megatron_logits

    chunks = build_model_chunks(arch, transformer_config(arch, layout, dtype="float32"))
    load_model_checkpoint(chunks, ckpt_dir)
    if rounding is not None:
        with torch.no_grad():
            for chunk in chunks:
                for param in chunk.parameters():
                    param.copy_(param.to(OUTPUT_DTYPES[rounding]))
    logits = megatron_logits(chunks, input_ids)
    return logits if is_logits_reporter(logits) else None


def _checkpoint_logits_rank(ckpt_dir, layout_fields, input_ids, rounding):
    from megatron_rl.parallel.state import destroy_parallel, initialize_parallel

    layout = ParallelLayout(**layout_fields)
    arch = load_arch(os.path.join(ckpt_dir, HF_CONFIG_DIR))
    initialize_parallel(layout)
    logits = _checkpoint_logits(ckpt_dir, arch, layout, input_ids, rounding)
    destroy_parallel()
    return logits


def comparison_dtype(*dtypes: str) -> str | None:
    """The precision both sides of a parity check are rounded to: the lowest of the stored dtypes (None: fp32).

    Both forwards run in fp32; rounding the weights of both to the lower-precision side makes a bf16
    checkpoint of an fp32 model (or the reverse) comparable to ~1e-5 instead of ~1e-1.
    """
    for low in ("bfloat16", "float16"):
        if low in dtypes:
            return low
    return None


def _parity(logits, hf_dir: str, input_ids, input_source: str, layout: str, world: int, tolerance: float,
            rounding: str | None):
    from megatron_rl.models.verify import ParityReport, hf_logits

    reference = hf_logits(hf_dir, input_ids, weights_dtype=OUTPUT_DTYPES[rounding] if rounding else None)
    return ParityReport(
        layout=layout, world_size=world, num_tokens=int(input_ids.numel()),
        max_abs_diff=float((logits - reference).abs().max()), max_abs_logit=float(reference.abs().max()),
        tolerance=tolerance, input_source=input_source,
    )


def verify_checkpoint(
    ckpt_dir: str | os.PathLike,
    hf_dir: str | os.PathLike,
    *,
    layout: ParallelLayout = ParallelLayout(),
    world_size: int | None = None,
    tolerance: float = 1e-4,
    timeout: float = 3600.0,
):
    """Logits of the checkpoint (Megatron in `layout`, fp32) vs the HF folder (transformers, fp32).

    Returns a `megatron_rl.models.verify.ParityReport` (export_bitexact is None: no export is involved).
    """
    from megatron_rl.models.verify import minimal_world_size
    from megatron_rl.parallel.spawn import spawn_ranks

    ckpt_dir, hf_dir = os.path.abspath(os.fspath(ckpt_dir)), os.path.abspath(os.fspath(hf_dir))
    info: CheckpointInfo = read_info(ckpt_dir)
    arch = load_arch(os.path.join(ckpt_dir, HF_CONFIG_DIR))
    hf_arch = load_arch(hf_dir)
    check_arch_matches(info, hf_arch, what=f"config.json in {hf_dir}")
    world = world_size or minimal_world_size(layout)
    layout.validate(world, arch)
    input_ids, input_source = verification_ids(hf_dir, arch.vocab_size)
    rounding = comparison_dtype(info.dtype, hf_arch.torch_dtype)
    results = spawn_ranks(
        _checkpoint_logits_rank, world, args=(ckpt_dir, dataclasses.asdict(layout), input_ids, rounding), timeout=timeout
    )
    logits = next(r for r in results if r is not None)
    return _parity(logits, hf_dir, input_ids, input_source, layout.describe(world), world, tolerance, rounding)
