"""The files of a megatron_rl checkpoint directory other than the tensors: `megatron_rl.json` and `hf_config/`.

`megatron_rl.json` records what is needed to use the checkpoint without the run that wrote it:
format name and version, the model architecture (`arch_summary`, every QwenArch field that changes the weights or
the math), the parallel layout and world size it was saved with (informational: loading reshards), the parameter
dtype, the sharded-state-dict options used (so a reader knows the key layout), and library versions.

`hf_config/` holds the Hugging Face side files (config.json, tokenizer files, generation_config.json) so a
checkpoint converts back to a complete HF folder on its own.
"""
from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import json
import os
import shutil
from dataclasses import dataclass
from typing import Any

from megatron_rl.checkpoint.names import INFO_FILE, MODEL_DIR, TMP_MARKER
from megatron_rl.models.qwen_arch import ModelConfigError, QwenArch

FORMAT_NAME = "megatron_rl.model_checkpoint"
FORMAT_VERSION = 1

# Files copied from an HF folder next to the weights (config, tokenizer, generation defaults, chat template).
HF_SIDE_FILE_PATTERNS = (
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template*",
)


class CheckpointFormatError(ValueError):
    """A checkpoint directory that is incomplete, of another format/version, or does not match the model."""


def arch_summary(arch: QwenArch) -> dict[str, Any]:
    """The architecture fields that determine the weights' names, shapes and the model's math (JSON-ready).

    `raw` (the whole HF config), `torch_dtype` (a storage detail) and the MoE aux-loss coefficient (a training
    setting) are left out.
    """
    out = {f.name: getattr(arch, f.name) for f in dataclasses.fields(arch) if f.name not in ("raw", "torch_dtype", "moe")}
    if arch.moe is not None:
        moe = dataclasses.asdict(arch.moe)
        moe["moe_layers"] = list(moe["moe_layers"])
        del moe["router_aux_loss_coef"]  # a training setting: changes neither the weights nor the forward pass
        out["moe"] = moe
    else:
        out["moe"] = None
    return out


def summary_mismatches(expected: dict[str, Any], actual: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable 'field: a != b' lines for every field where two arch summaries differ (nested dicts are
    compared field by field, e.g. 'moe.num_experts')."""
    lines = []
    for key in sorted(set(expected) | set(actual)):
        a, b = expected.get(key, "<absent>"), actual.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += summary_mismatches(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} != {b!r}")
    return lines


@dataclass(frozen=True)
class CheckpointInfo:
    """The parsed `megatron_rl.json` of a checkpoint directory."""

    arch: dict[str, Any]
    layout: dict[str, Any]
    world_size: int
    dtype: str
    sharded_metadata: dict[str, Any]
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "arch": self.arch,
            "layout": self.layout,
            "world_size": self.world_size,
            "dtype": self.dtype,
            "sharded_metadata": self.sharded_metadata,
            **self.extra,
        }


def library_versions() -> dict[str, str]:
    """Versions recorded for provenance (read from package metadata: importing megatron.core is slow)."""
    from importlib import metadata

    from megatron_rl import __version__

    versions = {"megatron_rl": __version__}
    for dist_name in ("torch", "megatron-core", "transformers"):
        try:
            versions[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_info(ckpt_dir: str, info: CheckpointInfo) -> None:
    payload = info.to_json()
    payload.setdefault("created", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    payload.setdefault("versions", library_versions())
    path = os.path.join(ckpt_dir, INFO_FILE)
    with open(path + ".part", "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(path + ".part", path)


def read_info(ckpt_dir: str | os.PathLike) -> CheckpointInfo:
    """Parse `<ckpt_dir>/megatron_rl.json`, refusing unfinished saves, other formats and newer versions."""
    ckpt_dir = os.fspath(ckpt_dir)
    if TMP_MARKER in os.path.basename(os.path.normpath(ckpt_dir)):
        raise CheckpointFormatError(
            f"{ckpt_dir} is the temporary directory of a save that did not finish (its name contains "
            f"'{TMP_MARKER}'); use a completed checkpoint directory"
        )
    if not os.path.isdir(ckpt_dir):
        raise CheckpointFormatError(f"checkpoint directory {ckpt_dir} does not exist")
    path = os.path.join(ckpt_dir, INFO_FILE)
    if not os.path.isfile(path):
        hint = ""
        if os.path.basename(os.path.normpath(ckpt_dir)) == MODEL_DIR and os.path.isfile(
            os.path.join(os.path.dirname(os.path.normpath(ckpt_dir)), INFO_FILE)
        ):
            hint = f" — pass its parent directory {os.path.dirname(os.path.normpath(ckpt_dir))} instead"
        raise CheckpointFormatError(f"{ckpt_dir} has no {INFO_FILE}: not a megatron_rl checkpoint directory{hint}")
    with open(path, encoding="utf-8") as f:
        try:
            payload = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointFormatError(f"{path} is not valid JSON: {e}") from None
    if payload.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(f"{path}: field 'format' is {payload.get('format')!r}, expected {FORMAT_NAME!r}")
    version = payload.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointFormatError(
            f"{path}: format_version {version!r} is newer than this megatron_rl understands ({FORMAT_VERSION}); "
            "upgrade megatron_rl"
        )
    missing = [k for k in ("arch", "layout", "world_size", "dtype", "sharded_metadata") if k not in payload]
    if missing:
        raise CheckpointFormatError(f"{path} lacks field(s) {missing}")
    known = {"format", "format_version", "arch", "layout", "world_size", "dtype", "sharded_metadata"}
    return CheckpointInfo(
        arch=payload["arch"],
        layout=payload["layout"],
        world_size=int(payload["world_size"]),
        dtype=str(payload["dtype"]),
        sharded_metadata=dict(payload["sharded_metadata"]),
        format_version=version,
        extra={k: v for k, v in payload.items() if k not in known},
    )


def check_arch_matches(info: CheckpointInfo, arch: QwenArch, *, what: str) -> None:
    """Raise ModelConfigError naming every field where `arch` (described by `what`) differs from the checkpoint."""
    diffs = summary_mismatches(info.arch, arch_summary(arch))
    if diffs:
        raise ModelConfigError(
            f"{what} does not match the checkpoint's model (checkpoint != {what}):\n  " + "\n  ".join(diffs)
            + "\nUse the config.json of the model this checkpoint was trained from."
        )


def hf_side_files(hf_dir: str) -> list[str]:
    """Names of the non-weight files of an HF folder that belong with the weights (config, tokenizer, ...)."""
    names = sorted(n for n in os.listdir(hf_dir) if os.path.isfile(os.path.join(hf_dir, n)))
    return [n for n in names if any(fnmatch.fnmatch(n, p) for p in HF_SIDE_FILE_PATTERNS)]


def copy_hf_side_files(src_dir: str, dst_dir: str, *, config: dict[str, Any] | None = None) -> list[str]:
    """Copy config/tokenizer/generation files from `src_dir`; `config`, when given, is written as config.json."""
    os.makedirs(dst_dir, exist_ok=True)
    copied = []
    for name in hf_side_files(src_dir):
        if name == "config.json" and config is not None:
            continue
        shutil.copyfile(os.path.join(src_dir, name), os.path.join(dst_dir, name))
        copied.append(name)
    if config is not None:
        write_hf_config(dst_dir, config)
        copied.append("config.json")
    return sorted(copied)


def write_hf_config(dst_dir: str, config: dict[str, Any]) -> None:
    with open(os.path.join(dst_dir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
