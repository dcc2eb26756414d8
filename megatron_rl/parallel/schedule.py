"""Thin pass-through to Megatron's pipeline schedules (no-pipelining, 1F1B, interleaved 1F1B).

`run_schedule` hides only the boilerplate: it builds the data iterator(s) (one per virtual stage), computes
the p2p tensor shape and picks the schedule. What a micro-batch's forward does and what is computed from the
last stage's output stay with the caller (`forward_step(batch, model) -> (output, on_output)`).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def run_schedule(
    chunks: list,
    microbatches: Sequence[Any],
    forward_step: Callable[[Any, torch.nn.Module], tuple[torch.Tensor, Callable]],
    *,
    seq_length: int,
    micro_batch_size: int,
    forward_only: bool,
    collect_outputs: bool = False,
) -> list:
    """Run every micro-batch through the model chunks with Megatron's forward_backward_func.

    forward_step(batch, model) returns (output_tensor, on_output). On the last pipeline stage Megatron calls
    `on_output(output_tensor)` (training: must return (loss, num_tokens, metrics)) or, with collect_outputs,
    `on_output(output_tensor, non_loss_data=True)` whose return values are collected and returned in order.
    Every rank must pass the same number of micro-batches; non-first stages ignore the batch's token ids but
    still receive it (their forward_step reads masks/positions from it).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    num_chunks = len(chunks)
    # Interleaved schedules take one iterator per virtual stage; each walks the same micro-batches.
    iterators = [iter(list(microbatches)) for _ in range(num_chunks)]

    def step(data_iterator, model):
        return forward_step(next(data_iterator), model)

    return get_forward_backward_func()(
        forward_step_func=step,
        data_iterator=iterators if num_chunks > 1 else iterators[0],
        model=chunks if num_chunks > 1 else chunks[0],
        num_microbatches=len(microbatches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
        collect_non_loss_data=collect_outputs,
    )
