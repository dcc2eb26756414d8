"""Settings of the Megatron training actor (validated dataclasses; the trainer's config tree embeds them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

from megatron_rl.algorithms import AGGREGATIONS, KL_ESTIMATORS, LOSS_REGISTRY, OffPolicyCorrection
from megatron_rl.errors import is_finite_number, require
from megatron_rl.parallel.layout import ParallelLayout


@dataclass(frozen=True)
class OptimizerSettings:
    """Adam(W) through Megatron's optimizer (fused Adam from TE/Apex on GPU, torch AdamW otherwise).

    name: "adam" (the default) or "sgd" (plain SGD without momentum: its update is the gradient itself, which
    the parallel-invariance tests use to compare gradients through updated weights).

    lr schedule: linear warm-up over `warmup_steps` from 0, then `decay_style` ("constant", "linear",
    "cosine") from lr to min_lr over `decay_steps` (None = constant after warm-up).
    """

    name: str = "adam"
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_steps: int | None = None
    decay_style: str = "constant"
    distributed_optimizer: bool = False

    def __post_init__(self):
        need = partial(require, section="optimizer")
        need(self.name in ("adam", "sgd"), "name", f"must be adam or sgd, got {self.name!r}")
        need(is_finite_number(self.lr) and self.lr > 0, "lr", f"must be a finite number > 0, got {self.lr!r}")
        need(is_finite_number(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr",
             f"must be in [0, lr={self.lr}], got {self.min_lr!r}")
        need(is_finite_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
             f"must be a finite number >= 0, got {self.weight_decay!r}")
        for name in ("adam_beta1", "adam_beta2"):
            value = getattr(self, name)
            need(is_finite_number(value) and 0 <= value < 1, name, f"must be in [0, 1), got {value!r}")
        need(is_finite_number(self.adam_eps) and self.adam_eps > 0, "adam_eps",
             f"must be a finite number > 0, got {self.adam_eps!r}")
        need(is_finite_number(self.clip_grad) and self.clip_grad >= 0, "clip_grad",
             f"must be a finite number >= 0 (0 disables clipping), got {self.clip_grad!r}")
        need(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        need(self.decay_steps is None or self.decay_steps >= 1, "decay_steps",
             f"must be >= 1 or null (constant after warm-up), got {self.decay_steps}")
        need(self.decay_style in ("constant", "linear", "cosine"), "decay_style",
             f"must be constant, linear or cosine, got {self.decay_style!r}")


@dataclass(frozen=True)
class PolicyLossSettings:
    """Which registered policy loss and its options (see megatron_rl.algorithms.policy_loss_share).

    clip_low / clip_high: None = the loss's paper defaults (LUSPO 2e-3 / 2.5e-3, GSPO 3e-4 / 4e-4, DAPO 0.2 / 0.28).
    max_response_length: Dr.GRPO's constant normaliser; None = the generation limit the trainer passes in.
    tis_cap: token-level truncated importance sampling against the rollout log-probs (None = off).
    off_policy: the other corrections against the behaviour (rollout) policy: sequence TIS, masked IS, IcePop,
    off-policy sequence masking (megatron_rl/algorithms/off_policy.py; docs/algorithms.md). The loss's own ratio
    stays against the recomputed old policy.
    exclude_fully_masked: the seq-mean losses (grpo, dr_grpo, gspo, gspo_token, luspo) divide by the number of
    sequences with at least one unmasked token instead of all sequences (verl's convention). False (default) keeps
    fully masked rows (e.g. truncated responses under algorithm.overlong mask_truncated) in N, as every measured
    result here did; see megatron_rl/algorithms/normalization.py, item 1.
    """

    name: str = "luspo"
    clip_low: float | None = None
    clip_high: float | None = None
    aggregation: str | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    tis_cap: float | None = None
    max_response_length: int | None = None
    exclude_fully_masked: bool = False
    off_policy: OffPolicyCorrection = field(default_factory=OffPolicyCorrection)

    def __post_init__(self):
        need = partial(require, section="loss")
        need(self.name in LOSS_REGISTRY, "name", f"must be a registered loss, one of {sorted(LOSS_REGISTRY)}; got "
             f"{self.name!r}")
        need(self.clip_low is None or (is_finite_number(self.clip_low) and 0 <= self.clip_low < 1), "clip_low",
             f"must be in [0, 1) (the ratio's lower bound 1 - clip_low stays > 0) or null for the loss's paper "
             f"default; got {self.clip_low!r}")
        need(self.clip_high is None or (is_finite_number(self.clip_high) and self.clip_high >= 0), "clip_high",
             f"must be a finite number >= 0 or null for the loss's paper default; got {self.clip_high!r}")
        need(self.aggregation is None or self.aggregation in AGGREGATIONS, "aggregation",
             f"must be one of {list(AGGREGATIONS)} or null (the loss's own); got {self.aggregation!r}")
        need(is_finite_number(self.kl_coef) and self.kl_coef >= 0, "kl_coef",
             f"must be a finite number >= 0 (0 disables the KL term); got {self.kl_coef!r}")
        need(self.kl_estimator in KL_ESTIMATORS, "kl_estimator",
             f"must be one of {list(KL_ESTIMATORS)}; got {self.kl_estimator!r}")
        need(is_finite_number(self.entropy_coef), "entropy_coef",
             f"must be a finite number (0 disables the entropy bonus); got {self.entropy_coef!r}")
        need(self.tis_cap is None or (is_finite_number(self.tis_cap) and self.tis_cap > 0), "tis_cap",
             f"must be a finite number > 0 or null (no truncated importance sampling); got {self.tis_cap!r}")
        need(self.max_response_length is None or self.max_response_length >= 1, "max_response_length",
             f"must be >= 1 or null (the generation limit); got {self.max_response_length!r}")
        need(isinstance(self.exclude_fully_masked, bool), "exclude_fully_masked",
             f"must be true or false, got {self.exclude_fully_masked!r}")

    def count_options(self) -> dict:
        """Keyword options for GlobalBatchCounts.from_masks: the loss settings that decide the step's counts."""
        return dict(exclude_fully_masked=self.exclude_fully_masked)

    def options(self) -> dict:
        """Keyword options for policy_loss_share (defaults left to the loss spec)."""
        out = dict(kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, entropy_coef=self.entropy_coef,
                   tis_cap=self.tis_cap)
        if self.off_policy.enabled:
            out["correction"] = self.off_policy
        for key in ("clip_low", "clip_high", "aggregation"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


@dataclass(frozen=True)
class MoESettings:
    """routing_replay (docs/actor.md, "Routing replay"; megatron_rl/actor/routing_replay.py): "none"; "rollout" (R3,
    arXiv 2510.11370): every actor pass over a sample (old and reference log-probs, the training forward) routes each
    token to the experts the rollout engine used, with the gate weights from the actor's own router logits;
    "old_policy" (R2, GSPO's Routing Replay, arXiv 2507.18071): the old-log-prob pass records the actor's own
    routing and the training passes replay it. MoE models only (refused for dense ones when the config loads)."""

    routing_replay: Literal["none", "rollout", "old_policy"] = "none"


@dataclass(frozen=True)
class ActorConfig:
    """model_path: HF folder of the model (the trainer fills it from model.path): its config.json defines the
    architecture, its weights are the starting point unless megatron_checkpoint is set. megatron_checkpoint: a
    megatron_rl checkpoint directory (convert-from-hf output or a training checkpoint's step_N) to start the policy
    and the KL reference from instead, in any saved layout (the trainer fills it from model.megatron_checkpoint).
    layout: TP/PP/CP/EP/ETP/VPP. dtype: float32 or bfloat16.

    packing: pack variable-length sequences into one THD stream per micro-batch (no padding); False pads every
    sequence of a micro-batch to the longest (bshd). max_tokens_per_microbatch: token budget that decides the
    number of micro-batches (balanced by tokens across DP ranks and micro-batches).
    temperature: the sampling temperature; log-probs are computed from logits / temperature, as vLLM samples.
    """

    model_path: str = ""
    megatron_checkpoint: str = ""
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    dtype: str = "float32"
    seed: int = 1234
    packing: bool = True
    max_tokens_per_microbatch: int = 8192
    temperature: float = 1.0
    recompute: bool = False
    moe_aux_loss_coeff: float = 0.0
    optimizer: OptimizerSettings = field(default_factory=OptimizerSettings)
    loss: PolicyLossSettings = field(default_factory=PolicyLossSettings)
    moe: MoESettings = field(default_factory=MoESettings)

    def __post_init__(self):
        need = partial(require, section="actor")
        need(self.dtype in ("float32", "bfloat16"), "dtype", f"must be float32 or bfloat16, got {self.dtype!r}")
        need(self.max_tokens_per_microbatch >= 1, "max_tokens_per_microbatch",
             f"must be >= 1, got {self.max_tokens_per_microbatch}")
        need(is_finite_number(self.temperature) and self.temperature > 0, "temperature",
             f"must be a finite number > 0, got {self.temperature!r}")
        need(is_finite_number(self.moe_aux_loss_coeff) and self.moe_aux_loss_coeff >= 0, "moe_aux_loss_coeff",
             f"must be a finite number >= 0, got {self.moe_aux_loss_coeff!r}")
