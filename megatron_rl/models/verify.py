"""Check that the Megatron model built from an HF folder computes the same logits as `transformers`.

`verify_model(hf_dir, layout)` spawns the ranks of `layout` on CPU (gloo), builds the sharded Megatron model,
loads the HF weights, runs a fixed prompt through Megatron's pipeline schedule, gathers the vocab-parallel
logits and compares them with `transformers` (fp32) in the parent process. Run this before trusting a new or
converted checkpoint: `megatron-rl verify-model --hf DIR --tp 2 --pp 2`.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch

from megatron_rl.models.hf_io import HFCheckpointReader
from megatron_rl.models.qwen_arch import load_arch
from megatron_rl.models.weight_mapping import expected_hf_names
from megatron_rl.parallel.layout import ParallelLayout

DEFAULT_PROMPT = "What is 17 + 25? Let me think step by step. The answer is 42."


@dataclass
class ParityReport:
    layout: str
    world_size: int
    num_tokens: int
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    export_bitexact: bool | None = None
    input_source: str = "prompt"  # or "... fixed token ids (no tokenizer in the folder)"

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance and self.export_bitexact is not False


def minimal_world_size(layout: ParallelLayout) -> int:
    """Smallest world in which both the dense (tp*pp*cp) and the expert (etp*ep*pp) decompositions fit."""
    dense, expert = layout.model_parallel_size, layout.etp * layout.ep * layout.pp
    return dense * expert // math.gcd(dense, expert)


def _gather_vocab_parallel(logits: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return logits.detach().clone()
    parts = [torch.empty_like(logits) for _ in range(size)]
    torch.distributed.all_gather(parts, logits.detach().contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def build_loaded_model(hf_dir: str, layout: ParallelLayout, *, dtype: str = "float32", seed: int = 1234):
    """On an initialised torch.distributed world: parallel groups, model chunks, HF weights. Returns (arch, chunks)."""
    from megatron_rl.models.builder import build_model_chunks, transformer_config
    from megatron_rl.models.weight_transfer import load_hf_weights
    from megatron_rl.parallel.state import initialize_parallel

    arch = load_arch(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    reader.validate(arch)
    layout.validate(torch.distributed.get_world_size(), arch)
    initialize_parallel(layout, seed=seed)
    chunks = build_model_chunks(arch, transformer_config(arch, layout, dtype=dtype))
    load_hf_weights(chunks, arch, reader)
    return arch, chunks


def megatron_logits(chunks: list, input_ids: torch.Tensor) -> torch.Tensor | None:
    """Full-vocab logits [b, s, V] of a causal forward, on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state as ps

    from megatron_rl.parallel.schedule import run_schedule

    batch, seq = input_ids.shape
    pad = (-seq) % ps.get_tensor_model_parallel_world_size()  # sequence parallel splits the sequence over TP
    tokens = torch.nn.functional.pad(input_ids, (0, pad))  # right padding cannot affect a causal prefix
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens).contiguous()
    if torch.cuda.is_available():
        tokens, positions = tokens.cuda(), positions.cuda()

    def forward_step(_batch, model):
        output = model(tokens, positions, attention_mask=None)
        return output, lambda out, non_loss_data=False: _gather_vocab_parallel(out)[:, :seq].float().cpu()

    for chunk in chunks:
        chunk.eval()
    # the interleaved schedule needs at least PP micro-batches; repeat the prompt and keep the first output
    num_microbatches = ps.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    with torch.no_grad():
        outputs = run_schedule(
            chunks, [None] * num_microbatches, forward_step, seq_length=tokens.shape[1], micro_batch_size=batch,
            forward_only=True, collect_outputs=True,
        )
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        return outputs[0]
    return None


def is_logits_reporter(logits: torch.Tensor | None) -> bool:
    """Whether this rank reports `megatron_logits`' result: the one rank of the last pipeline stage with TP, DP
    and CP rank 0 (the other last-stage ranks hold identical copies)."""
    from megatron.core import parallel_state as ps

    return (
        logits is not None and ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        and ps.get_context_parallel_rank() == 0
    )


def _parity_rank(hf_dir: str, layout_fields: dict, input_ids: torch.Tensor, check_export: bool):
    from megatron_rl.models.weight_transfer import export_hf_weights
    from megatron_rl.parallel.state import destroy_parallel

    layout = ParallelLayout(**layout_fields)
    arch, chunks = build_loaded_model(hf_dir, layout)
    logits = megatron_logits(chunks, input_ids)
    export_ok = None
    if check_export:
        reader = HFCheckpointReader(hf_dir)
        export_ok, exported = True, []
        for bucket in export_hf_weights(chunks, arch, bucket_bytes=1 << 20, dst=0):
            for name, tensor in bucket:
                exported.append(name)
                export_ok &= torch.equal(tensor, reader.get(name))
        if torch.distributed.get_rank() == 0:  # every HF tensor exactly once, not just "what came out matched"
            export_ok &= sorted(exported) == sorted(expected_hf_names(arch))
    is_reporter = is_logits_reporter(logits)
    destroy_parallel()
    return {"logits": logits if is_reporter else None, "export_ok": export_ok if torch.distributed.get_rank() == 0 else None}


def hf_logits(hf_dir: str, input_ids: torch.Tensor, weights_dtype: torch.dtype | None = None) -> torch.Tensor:
    """transformers logits in fp32; `weights_dtype` first rounds every weight to that dtype (e.g. bfloat16) so the
    reference sees the same weights as a model loaded from a lower-precision checkpoint."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        if weights_dtype is not None:
            for param in model.parameters():
                param.copy_(param.to(weights_dtype))
        return model(input_ids=input_ids).logits.float()


def prompt_ids(hf_dir: str, prompt: str = DEFAULT_PROMPT) -> torch.Tensor:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.numel() == 0:
        raise ValueError("the verification prompt tokenized to zero tokens")
    return ids


NUM_FIXED_IDS = 32


def verification_ids(hf_dir: str, vocab_size: int, prompt: str | None = None) -> tuple[torch.Tensor, str]:
    """Token ids [1, n] to compare logits on, and where they came from.

    The prompt tokenized with the folder's tokenizer when it has one (`tokenizer*` files). A folder without a
    tokenizer (weights and config only, as some conversions write) gets NUM_FIXED_IDS fixed ids spread over the
    vocabulary instead, since logit parity does not need text; asking for a `prompt` there is an error, not
    silently ignored."""
    if any(name.startswith("tokenizer") for name in os.listdir(hf_dir)):
        return prompt_ids(hf_dir, prompt or DEFAULT_PROMPT), "prompt"
    if prompt is not None:
        raise FileNotFoundError(
            f"{hf_dir} has no tokenizer files, so --prompt cannot be tokenized: copy the tokenizer next to "
            "config.json or leave --prompt out (fixed token ids are used then)"
        )
    ids = torch.arange(NUM_FIXED_IDS, dtype=torch.long) * 7919 % vocab_size  # 7919 (prime) spreads them out
    return ids.unsqueeze(0), f"{NUM_FIXED_IDS} fixed token ids (no tokenizer in the folder)"


def verify_model(
    hf_dir: str,
    layout: ParallelLayout,
    *,
    world_size: int | None = None,
    tolerance: float = 1e-4,
    prompt: str | None = None,
    check_export: bool = True,
    timeout: float = 900.0,
) -> ParityReport:
    """Compare Megatron (sharded per `layout`) and transformers logits; also check export(import(hf)) == hf.

    prompt: the text to run (default DEFAULT_PROMPT); see `verification_ids` for folders without a tokenizer.
    Every input check (config, tensors and shapes, layout vs world and model) runs before any rank is spawned."""
    from megatron_rl.parallel.spawn import spawn_ranks

    hf_dir = os.path.abspath(hf_dir)
    arch = load_arch(hf_dir)  # fail fast on bad configs, before spawning anything
    HFCheckpointReader(hf_dir).validate(arch)
    world = world_size or minimal_world_size(layout)
    layout.validate(world, arch)
    input_ids, source = verification_ids(hf_dir, arch.vocab_size, prompt)
    results = spawn_ranks(_parity_rank, world, args=(hf_dir, asdict(layout), input_ids, check_export), timeout=timeout)
    logits = next(r["logits"] for r in results if r["logits"] is not None)
    reference = hf_logits(hf_dir, input_ids)
    return ParityReport(
        layout=layout.describe(world),
        world_size=world,
        num_tokens=int(input_ids.numel()),
        max_abs_diff=float((logits - reference).abs().max()),
        max_abs_logit=float(reference.abs().max()),
        tolerance=tolerance,
        export_bitexact=results[0]["export_ok"],
        input_source=source,
    )
