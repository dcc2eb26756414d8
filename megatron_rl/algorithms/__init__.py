"""RL algorithms in pure torch: advantages, policy losses, KL, the normalisation contract, CP helpers.

Nothing here imports megatron, ray or vllm; process groups are passed in. Start with
`normalization.py` (the loss-normalisation contract) and `losses.py` (the loss registry).
"""
from megatron_rl.algorithms.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, register_advantage_estimator
from megatron_rl.algorithms.context_parallel import (
    cp_chunk_ranges,
    cp_local_positions,
    gather_from_cp,
    merge_cp_parts,
    reduce_sequence_sums,
    reduce_sequence_sums_differentiable,
    split_for_cp,
)
from megatron_rl.algorithms.kl import KL_ESTIMATORS, kl_estimate
from megatron_rl.algorithms.losses import (
    LOSS_REGISTRY,
    LossSpec,
    get_loss_spec,
    policy_loss,
    policy_loss_share,
    register_loss,
)
from megatron_rl.algorithms.metrics import LossMetrics
from megatron_rl.algorithms.normalization import AGGREGATIONS, GlobalBatchCounts, token_weights
from megatron_rl.algorithms.off_policy import MIS_LEVELS, OffPolicyCorrection, off_policy_weights
from megatron_rl.algorithms.sft import sft_loss_share

# --- dynamic sampling / LSPO (owned by the sampling module) ---
from megatron_rl.algorithms.dynamic_sampling import (
    DynamicSamplingCapWarning,
    DynamicSamplingConfig,
    FilledBatch,
    GroupOutcome,
    SamplingMetrics,
    cap_message,
    fill_batch,
    reward_variance_mask,
    select_round,
)
from megatron_rl.algorithms.lspo import LengthQuantiles, LSPOConfig, empirical_quantiles, lspo_keep_mask
from megatron_rl.algorithms.overlong import (
    OverlongConfig,
    apply_overlong_penalty,
    apply_truncation_mask,
    soft_overlong_penalty,
)
from megatron_rl.algorithms.rank0 import Rank0DecisionError, broadcast_indices, decide_on_rank0, select_on_rank0
