"""vLLM rollout pool on Ray: generation with log-probs, in-place weight sync, engine health. See pool.py.

Importing this package imports neither Ray nor vLLM (they load when a pool starts).
"""
from megatron_rl.rollout.config import EngineConfig, RolloutPoolConfig
from megatron_rl.rollout.mismatch import MismatchMetrics, pad_logprobs, rollout_mismatch
from megatron_rl.rollout.pool import RolloutError, RolloutPool
from megatron_rl.rollout.types import Completion, FinishReason, PoolStats, SamplingConfig, WeightSyncStats

__all__ = [
    "Completion",
    "EngineConfig",
    "FinishReason",
    "MismatchMetrics",
    "PoolStats",
    "RolloutError",
    "RolloutPool",
    "RolloutPoolConfig",
    "SamplingConfig",
    "WeightSyncStats",
    "pad_logprobs",
    "rollout_mismatch",
]

