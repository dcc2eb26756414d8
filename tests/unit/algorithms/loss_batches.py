"""A small deterministic policy-loss batch shared by the loss tests (unit and distributed).

Rows are 4 prompts x 4 responses. Lengths include an empty response, length-1 and length-2 responses and a
full-width one; one group has all-equal rewards (so its GRPO advantages are 0). The per-row scale of
logp - logp_old ranges from 1e-5 to 0.3 so that every loss has both clipped and unclipped sequences/tokens
(GSPO's eps is 3e-4, LUSPO's 2e-3, the token losses' 0.2); seed 1 gives every loss tokens clipped low,
clipped high and unclipped, and so does seed 6 (the reference tests assert it for both, so a changed seed cannot
make them vacuous; most other seeds miss one of the three for some loss).
"""
import torch

from megatron_rl.algorithms import compute_advantages

GROUP_SIZE = 4
LOG_RATIO_SCALES = (0.1, 1e-5, 0.3, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 0.1, 0.3, 0.3, 1e-5, 0.3, 1e-3, 3e-4, 1e-2)


def make_batch(seed: int = 1, rows: int = 16, width: int = 16, dtype=torch.float64) -> dict:
    """Tensors of one full (single-process) batch: log_probs, old_log_probs, rollout_log_probs, ref_log_probs,
    entropy, response_mask [rows, width]; rewards, advantages [rows]; token_advantages [rows, width]."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, width + 1, (rows,), generator=g)
    lengths[:4] = torch.tensor([0, 1, 2, width])  # empty, length-1, length-2, full
    mask = torch.arange(width)[None, :] < lengths[:, None]
    log_probs = -torch.rand(rows, width, generator=g, dtype=dtype) * 3 - 0.05
    scales = torch.tensor(LOG_RATIO_SCALES, dtype=dtype).repeat(rows // len(LOG_RATIO_SCALES) + 1)[:rows]
    # a per-row drift plus per-token noise, both at the row's scale: sequence ratios then land on both sides of 1.
    drift = scales * torch.randn(rows, 1, generator=g, dtype=dtype).squeeze(1)
    old_log_probs = log_probs - drift[:, None] - scales[:, None] * torch.randn(rows, width, generator=g, dtype=dtype)
    rollout_log_probs = old_log_probs + 0.3 * torch.randn(rows, width, generator=g, dtype=dtype)
    ref_log_probs = log_probs + 0.2 * torch.randn(rows, width, generator=g, dtype=dtype)
    entropy = torch.rand(rows, width, generator=g, dtype=dtype) * 2
    rewards = torch.randint(0, 2, (rows,), generator=g).to(dtype)
    rewards[4:8] = 1.0  # one group with all-equal rewards
    advantages = compute_advantages("grpo", rewards, GROUP_SIZE)
    token_advantages = advantages[:, None] + 0.5 * torch.randn(rows, width, generator=g, dtype=dtype)
    return dict(
        log_probs=log_probs, old_log_probs=old_log_probs, rollout_log_probs=rollout_log_probs,
        ref_log_probs=ref_log_probs, entropy=entropy, response_mask=mask, rewards=rewards,
        advantages=advantages, token_advantages=token_advantages,
    )


# Rows fully masked by `with_fully_masked_rows` (row 0 is already the empty response): with DP=2 (rows interleaved)
# and 4 micro-batches, rows 8 and 10 make one whole micro-batch of DP rank 0 fully masked.
FULLY_MASKED_ROWS = (5, 8, 10)
# A row whose valid tokens are only positions 4..7: under CP=2 they all lie in CP rank 1's chunks (rank 0 holds
# 0-3 and 12-15 of the 16 positions), so CP rank 0 sees it fully masked although the sequence is not.
CP_ONE_SIDED_ROW = 9


def with_fully_masked_rows(batch: dict) -> dict:
    """The batch with rows masked out as `mask_truncated` does to truncated responses (FULLY_MASKED_ROWS), and
    CP_ONE_SIDED_ROW keeping positions 4..7 only. Every other tensor is unchanged."""
    mask = batch["response_mask"].clone()
    mask[list(FULLY_MASKED_ROWS)] = False
    mask[CP_ONE_SIDED_ROW] = False
    mask[CP_ONE_SIDED_ROW, 4:8] = True
    return {**batch, "response_mask": mask}
