"""Each step's trained batch as a columnar file, for debugging without re-rolling (`logging.save_rollouts: true`).

    <run dir>/rollouts/step_000012.parquet      one row per sample of every group the step generated

Columns: step, group (index in generation order), prompt_row (dataset row), kept (trained, or filtered out by
dynamic sampling / LSPO), sample_index, prompt_ids, response_ids, rollout_log_probs, loss_mask, score (verifier),
reward (after overlong shaping), advantage (kept samples; NaN for filtered ones), finish_reason, weights_version
(that generated it), routed_experts (MoE routing replay: the raw bytes of the [tokens, MoE layers, top-k] array, with
routed_experts_shape and routed_experts_dtype). The kept rows, in file order, are exactly the trained ActorBatch, so
`megatron-rl replay-step`
rebuilds it bit for bit (`load_step_batch`). A batch restored from a checkpoint of an asynchronous run carries
only its kept groups (the filtered ones were not saved with it).
"""
from __future__ import annotations

import math
import os

import torch

from megatron_rl.actor.batch import ActorBatch

ROLLOUTS_DIR = "rollouts"

__all__ = ["ROLLOUTS_DIR", "load_step_batch", "save_step_rollouts", "step_file"]


def step_file(directory: str, step: int) -> str:
    return os.path.join(directory, f"step_{step:06d}.parquet")


def save_step_rollouts(directory: str, rollouts, batch: ActorBatch, weights_version: int) -> str:
    """Write step `rollouts.step`: every generated group (kept first as trained, then the filtered ones) and, for the
    kept samples, the batch's advantages and loss masks. Returns the file's path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    kept_ids = {id(g) for g in rollouts.groups}
    filtered = [g for g in rollouts.generated if id(g) not in kept_ids] if rollouts.generated else []
    index = 0
    for group_index, (group, kept) in enumerate([(g, True) for g in rollouts.groups] + [(g, False) for g in filtered]):
        for sample, completion in enumerate(group.completions):
            if kept:
                advantage, mask = float(batch.advantages[index]), batch.loss_mask[index].tolist()
                index += 1
            else:
                advantage, mask = math.nan, [True] * len(completion.token_ids)
            rows.append({
                "step": rollouts.step, "group": group_index, "prompt_row": group.prompt.row, "kept": kept,
                "sample_index": sample, "prompt_ids": list(group.prompt.prompt_token_ids),
                "response_ids": completion.token_ids, "rollout_log_probs": completion.logprobs, "loss_mask": mask,
                "score": float(group.scores[sample]), "reward": float(group.rewards[sample]), "advantage": advantage,
                "finish_reason": completion.finish_reason, "weights_version": completion.weights_version,
                "routed_experts": None if completion.routed_experts is None else completion.routed_experts.tobytes(),
                "routed_experts_shape": None if completion.routed_experts is None
                else list(completion.routed_experts.shape),
                "routed_experts_dtype": None if completion.routed_experts is None
                else str(completion.routed_experts.dtype),
            })
    os.makedirs(directory, exist_ok=True)
    path = step_file(directory, rollouts.step)
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("step", pa.int64()), ("group", pa.int64()), ("prompt_row", pa.int64()), ("kept", pa.bool_()),
        ("sample_index", pa.int64()), ("prompt_ids", pa.list_(pa.int64())), ("response_ids", pa.list_(pa.int64())),
        ("rollout_log_probs", pa.list_(pa.float64())), ("loss_mask", pa.list_(pa.bool_())), ("score", pa.float64()),
        ("reward", pa.float64()), ("advantage", pa.float64()), ("finish_reason", pa.string()),
        ("weights_version", pa.int64()), ("routed_experts", pa.binary()),
        ("routed_experts_shape", pa.list_(pa.int64())), ("routed_experts_dtype", pa.string()),
    ]))
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)  # a reader never sees half a file
    return path


def load_step_batch(path: str) -> ActorBatch:
    """The trained ActorBatch of a saved step (the kept rows, in order): ids, advantages, rollout log-probs, masks."""
    import pyarrow.parquet as pq

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: was the run trained with logging.save_rollouts=true?")
    kept = [r for r in pq.read_table(path).to_pylist() if r["kept"]]
    if not kept:
        raise ValueError(f"{path} holds no trained sample (the step made no update)")
    routed = None
    if kept[0].get("routed_experts") is not None:
        import numpy as np

        routed = [torch.from_numpy(np.frombuffer(r["routed_experts"], dtype=r["routed_experts_dtype"])
                                   .reshape(r["routed_experts_shape"]).copy()) for r in kept]
    return ActorBatch(
        prompt_ids=[r["prompt_ids"] for r in kept], response_ids=[r["response_ids"] for r in kept],
        advantages=torch.tensor([r["advantage"] for r in kept], dtype=torch.float32),
        rollout_log_probs=[r["rollout_log_probs"] for r in kept],
        loss_mask=[torch.tensor(r["loss_mask"], dtype=torch.bool) for r in kept],
        routed_experts=routed,
    )
