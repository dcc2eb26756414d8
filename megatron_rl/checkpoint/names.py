"""Every name inside a checkpoint directory, defined once (docs/training.md, "Checkpoints").

A training checkpoint is one step directory; a model checkpoint (`megatron-rl convert-from-hf` output) is the same
directory without the trainer's files:

    <run dir>/checkpoints/step_000012/         STEP_DIR_FORMAT
        megatron_rl.json                       INFO_FILE       format, architecture, layout, dtype (format.py)
        model/                                 MODEL_DIR       Megatron distributed checkpoint of the model
        hf_config/                             HF_CONFIG_DIR   config.json + tokenizer of the HF source model
        optimizer/                             OPTIMIZER_DIR   distributed optimizer state (actor_state.py)
        reference/                             REFERENCE_DIR   the KL reference once reset (a model checkpoint)
        trainer_state.json                     TRAINER_STATE   step, sampler, LR schedule, weights version (run_state.py)
        rng.pt                                 RNG_FILE        the driver's RNG states
        metrics.jsonl                          METRICS_FILE    the metrics history up to this step
        pending_rollouts.json                  PENDING_ROLLOUTS generated, not yet trained batches (asynchronous runs)
        config.yaml                            RUN_CONFIG      the resolved config the run was trained with
        pending_routing.pt                     PENDING_ROUTING their routed experts (MoE routing replay; tensors only)

While being written a directory carries TMP_MARKER in its name; it is renamed when complete, and every reader
ignores such directories.
"""
from __future__ import annotations

import re

INFO_FILE = "megatron_rl.json"
MODEL_DIR = "model"
HF_CONFIG_DIR = "hf_config"
OPTIMIZER_DIR = "optimizer"
REFERENCE_DIR = "reference"
TRAINER_STATE = "trainer_state.json"
RNG_FILE = "rng.pt"
METRICS_FILE = "metrics.jsonl"
PENDING_ROLLOUTS = "pending_rollouts.json"
RUN_CONFIG = "config.yaml"
PENDING_ROUTING = "pending_routing.pt"
TMP_MARKER = ".tmp-"
CHECKPOINTS_DIR = "checkpoints"  # under the run directory

STEP_DIR_FORMAT = "step_{step:06d}"
STEP_DIR_PATTERN = re.compile(r"^step_(\d{6,})$")
