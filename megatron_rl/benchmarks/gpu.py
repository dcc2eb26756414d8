"""GPU mode: bf16 train-step throughput and model FLOPs utilisation (MFU) against the GPU's measured matmul peak.

    rows = gpu_rows(workdir)        # needs CUDA; raises GpuUnavailable with the reason otherwise

1. Peak: the best TFLOP/s of a large bf16 `torch.matmul` ([n, n] x [n, n], 2 n^3 FLOPs, timed with CUDA
   events) on this GPU: a reachable ceiling, usually below the datasheet's dense bf16 figure.
2. The train benchmark (`megatron_rl.benchmarks.train`: plain PyTorch vs the Megatron actor, packed vs padded)
   in bf16 on the GPU, single rank (nccl), a ~0.4B-parameter Qwen3 (`models.SIZES["gpu"]`) at a few thousand
   tokens per sequence; each step's wall time is taken between `torch.cuda.synchronize()` calls.
3. MFU = model FLOPs of the step's REAL tokens (padding is waste, not model work) / step seconds / peak, with
   model FLOPs per sequence of length L (Megatron-LM's accounting, Narayanan et al. 2021, arXiv 2104.04473, and
   PaLM's MFU, Chowdhery et al. 2022, arXiv 2204.02311 app. B): 6 x L x (matmul parameters incl. the LM head)
   for forward + backward of the dense layers, plus causal attention 6 x L^2 x (heads x head_dim) per layer
   (QK^T and AV, 2 L^2 d each in the forward, halved by the causal mask, x3 for forward + backward).
   Activation recomputation, if enabled, is not counted (MFU, not HFU).

UNTESTED: written on a CPU-only machine; the CPU paths it shares (bench_rank, FLOP counting) are tested, the CUDA
parts (nccl, CUDA events, bf16 Megatron actor on a GPU) have never run. Check the first numbers critically.
"""
from __future__ import annotations

import os
from typing import Any

import torch


class GpuUnavailable(RuntimeError):
    """The GPU benchmark was asked for where no CUDA device is usable."""


def require_cuda() -> None:
    if not torch.cuda.is_available():
        build = torch.__version__
        raise GpuUnavailable(
            f"the gpu benchmark needs a CUDA GPU, but torch.cuda.is_available() is False here (torch {build}"
            f"{', a CPU-only build' if '+cpu' in build else ''}). Run it on a GPU node with the CUDA image "
            "(docker/), or use the CPU benchmarks: tools/benchmark.py train / rollout / sync / step / cp."
        )


def matmul_peak_tflops(n: int = 8192, dtype: torch.dtype = torch.bfloat16, iters: int = 20, trials: int = 3) -> float:
    """Best measured TFLOP/s of an [n, n] x [n, n] matmul on the current CUDA device."""
    require_cuda()
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        torch.cuda.synchronize()
        seconds = start.elapsed_time(end) / 1e3 / iters
        best = max(best, 2 * n**3 / seconds / 1e12)
    return best


def matmul_parameters(arch) -> int:
    """Parameters that take part in matmuls: attention projections, MLP (dense or the top-k routed experts'
    share per token), and the LM head. Embedding lookups and norms do no matmul work."""
    h, d = arch.hidden_size, arch.head_dim
    attention = h * arch.num_attention_heads * d + 2 * h * arch.num_kv_heads * d + arch.num_attention_heads * d * h
    if arch.moe is not None:
        mlp = arch.moe.top_k * 3 * h * arch.moe.expert_ffn_hidden_size + h * arch.moe.num_experts  # + router
    else:
        mlp = 3 * h * arch.ffn_hidden_size  # SwiGLU: gate, up, down
    return arch.num_layers * (attention + mlp) + h * arch.vocab_size


def train_step_flops(lengths: list[int], arch) -> float:
    """Model FLOPs of forward + backward over sequences of these lengths (module docstring)."""
    dense = 6 * matmul_parameters(arch) * sum(lengths)
    attention = 6 * arch.num_layers * arch.num_attention_heads * arch.head_dim * sum(n * n for n in lengths)
    return float(dense + attention)


def gpu_rows(workdir: str, *, seq_len: int = 4096, num_sequences: int = 16, spreads: tuple[float, ...] = (1, 10),
             steps: int = 5, warmup: int = 2, size: str = "gpu", max_tokens: int | None = None) -> dict[str, Any]:
    """Peak, per-variant bf16 step times and MFU. Runs in this process on CUDA device 0 (one nccl rank)."""
    require_cuda()
    import torch.distributed as dist

    from megatron_rl.benchmarks.models import bench_model, vocab_size
    from megatron_rl.benchmarks.train import bench_rank, default_variants, summarize
    from megatron_rl.models.qwen_arch import load_arch
    from megatron_rl.parallel.spawn import free_port
    from megatron_rl.parallel.state import init_distributed_from_env

    model_path = bench_model(size, workdir)
    arch = load_arch(model_path)
    peak = matmul_peak_tflops()
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    init_distributed_from_env("nccl")
    try:
        variants = default_variants(num_sequences, seq_len, spreads)
        results = bench_rank(model_path, variants, steps=steps, warmup=warmup,
                             max_tokens=max_tokens or seq_len * 4, dtype="bfloat16", device="cuda",
                             vocab=vocab_size(model_path))
    finally:
        dist.destroy_process_group()
    out = summarize(variants, results)
    for v, run in zip(variants, out["runs"]):
        flops = train_step_flops(v["lengths"], arch)
        run["model_TFLOP"] = round(flops / 1e12, 2)
        run["MFU (step, median)"] = round(flops / run["step_s median"] / (peak * 1e12), 3)
        run["MFU (step, best)"] = round(flops / run["step_s min"] / (peak * 1e12), 3)
    params = matmul_parameters(arch)
    out["peak"] = [{"measured bf16 matmul peak TFLOP/s": round(peak, 1), "gpu": torch.cuda.get_device_name(0),
                    "model": os.path.basename(model_path), "matmul params (M)": round(params / 1e6, 1)}]
    return out
