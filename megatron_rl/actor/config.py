"""Settings of the Megatron training actor (validated dataclasses; the trainer's config tree embeds them)."""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_rl.algorithms import get_loss_spec
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
        if self.name not in ("adam", "sgd"):
            raise ValueError(f"optimizer.name must be adam or sgd, got {self.name!r}")
        if not self.lr > 0:
            raise ValueError(f"optimizer.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"optimizer.min_lr must be in [0, lr], got {self.min_lr}")
        if self.weight_decay < 0:
            raise ValueError(f"optimizer.weight_decay must be >= 0, got {self.weight_decay}")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("optimizer.adam_beta1 and adam_beta2 must be in [0, 1)")
        if self.clip_grad < 0:
            raise ValueError(f"optimizer.clip_grad must be >= 0 (0 disables clipping), got {self.clip_grad}")
        if self.warmup_steps < 0:
            raise ValueError(f"optimizer.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"optimizer.decay_style must be constant, linear or cosine, got {self.decay_style!r}")


@dataclass(frozen=True)
class PolicyLossSettings:
    """Which registered policy loss and its options (see megatron_rl.algorithms.policy_loss_share).

    clip_low / clip_high: None = the loss's paper defaults (LUSPO 2e-3 / 2.5e-3, GSPO 3e-4 / 4e-4, DAPO 0.2 / 0.28).
    max_response_length: Dr.GRPO's constant normaliser; None = the generation limit the trainer passes in.
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

    def __post_init__(self):
        get_loss_spec(self.name)  # unknown names raise with the registered list
        if not isinstance(self.exclude_fully_masked, bool):
            raise ValueError(f"loss.exclude_fully_masked must be true or false, got {self.exclude_fully_masked!r}")
        if self.kl_coef < 0:
            raise ValueError(f"loss.kl_coef must be >= 0, got {self.kl_coef}")
        if self.kl_estimator not in ("k1", "k2", "k3", "low_var_kl"):
            raise ValueError(f"loss.kl_estimator must be k1, k2, k3 or low_var_kl, got {self.kl_estimator!r}")
        if self.tis_cap is not None and not self.tis_cap > 0:
            raise ValueError(f"loss.tis_cap must be > 0 or null, got {self.tis_cap}")

    def count_options(self) -> dict:
        """Keyword options for GlobalBatchCounts.from_masks: the loss settings that decide the step's counts."""
        return dict(exclude_fully_masked=self.exclude_fully_masked)

    def options(self) -> dict:
        """Keyword options for policy_loss_share (defaults left to the loss spec)."""
        out = dict(kl_coef=self.kl_coef, kl_estimator=self.kl_estimator, entropy_coef=self.entropy_coef,
                   tis_cap=self.tis_cap)
        for key in ("clip_low", "clip_high", "aggregation"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


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

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"actor.dtype must be float32 or bfloat16, got {self.dtype!r}")
        if self.max_tokens_per_microbatch < 1:
            raise ValueError(f"actor.max_tokens_per_microbatch must be >= 1, got {self.max_tokens_per_microbatch}")
        if not self.temperature > 0:
            raise ValueError(f"actor.temperature must be > 0, got {self.temperature}")
        if self.moe_aux_loss_coeff < 0:
            raise ValueError(f"actor.moe_aux_loss_coeff must be >= 0, got {self.moe_aux_loss_coeff}")
