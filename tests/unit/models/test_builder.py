"""models/builder.py's choice of core attention: our SDPA module wherever the layer spec's own cannot run the actor's
batches (the local spec always; Transformer Engine's for an fp32 model, which it cannot run on packed sequences).
Every CPU test builds the local spec, so the SDPA path itself is tested everywhere; the TE spec needs a GPU."""
import pytest
import torch

from megatron_rl.models.builder import uses_torch_core_attention


@pytest.mark.parametrize("use_te, dtype, ours", [
    (False, torch.float32, True),   # the local spec: its attention refuses packing and CP
    (False, torch.bfloat16, True),
    (True, torch.bfloat16, False),  # TE's flash/fused attention
    (True, torch.float16, False),
    (True, torch.float32, True),    # TE has no fp32 attention for packed (THD) sequences
])
def test_core_attention_is_ours_wherever_the_spec_cannot_run_packed_batches(use_te, dtype, ours):
    assert uses_torch_core_attention(use_te, dtype) is ours
