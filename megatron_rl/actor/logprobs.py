"""Per-token log-probabilities and entropies from vocab-parallel logits (each TP rank holds V/tp columns).

log p(y_t) = l[y_t] - logsumexp(l) is Megatron's `vocab_parallel_cross_entropy` negated (it all-reduces the max
and the sum of exponentials over TP; differentiable). The entropy H = log Z - sum_v p_v l_v uses the same two
all-reduces, through Megatron's `reduce_from_tensor_model_parallel_region` (forward all-reduce, backward
identity), so its gradient is exact under TP. Logits are divided by the sampling temperature first, as vLLM does
before sampling, so that training and rollout compare like with like.
"""
from __future__ import annotations

import torch


def token_log_probs(vocab_parallel_logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [n, V/tp], labels [n] -> log-probs [n] (fp32, differentiable)."""
    from megatron.core import tensor_parallel

    logits = vocab_parallel_logits.float() / temperature  # a new tensor: Megatron's CE modifies its input in place
    return -tensor_parallel.vocab_parallel_cross_entropy(logits.unsqueeze(1), labels.unsqueeze(1)).squeeze(1)


def token_entropy(vocab_parallel_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits [n, V/tp] -> entropy of the full-vocabulary distribution [n] (fp32, differentiable)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

    logits = vocab_parallel_logits.float() / temperature
    shift = logits.detach().max(dim=-1).values
    group = parallel_state.get_tensor_model_parallel_group()
    if torch.distributed.get_world_size(group) > 1:
        torch.distributed.all_reduce(shift, op=torch.distributed.ReduceOp.MAX, group=group)
    shifted = logits - shift.unsqueeze(-1)
    exp = shifted.exp()
    partition = reduce_from_tensor_model_parallel_region(exp.sum(-1))
    weighted = reduce_from_tensor_model_parallel_region((exp * shifted).sum(-1))
    return partition.log() - weighted / partition
