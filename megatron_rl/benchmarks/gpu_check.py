"""The GPU check: what only a CUDA machine can verify, in one run of a few minutes, written up as one Markdown report.

    bash tools/gpu_check.sh --report tools/GPU_CHECK.md        # on a GPU machine (CUDA torch + megatron-core)
    bash tools/gpu_check.sh --dry-run --report /tmp/plan.md    # anywhere: import everything, plan, skip every check

Checks, in order (each one's result, numbers and any error go into the report; a failure does not stop the rest):
1. `cuda`: the device, its memory and the torch / CUDA build.
2. `bf16_logits`: a tiny Qwen3 built by the Megatron actor's model builder in bf16 on one GPU (one nccl rank), its
   logits against transformers' fp32 forward of the same bf16-rounded weights (`models/verify.py`). bf16 keeps ~3
   significant digits, so the bar is a max |logit diff| of 5e-2 on logits of magnitude ~1-10 (fp32 on CPU: 1e-4).
3. `cuda_ipc`: a 256 MiB buffer shared with a second process through CUDA IPC by the ipc weight transport's own
   code (`rollout/shared_buffers.py`: torch's `reduce_tensor`, the mechanism of vLLM's `ipc` backend): the child
   opens it as the transport's worker does, reads it in place, checks its bytes and that it files the GPU under the
   sender's device key (UUID); the report gives the time to open the handle and copy the buffer on the GPU.
4. `train_step_mfu`: bf16 train steps of the Megatron actor on a stack of Qwen2.5-7B-shaped layers (hidden 3584, 28
   heads of 128, 4 KV heads, MLP 18944; `benchmarks/models.py` "qwen7b_slice") and the MFU against the measured
   matmul peak (`benchmarks/gpu.py`).
5. `nccl_transport`: the nccl weight transport's data plane between two processes on two GPUs (our `NcclGroup` and
   trainer engine: a bucket bit-exact, a receiver that dies or idles releases the sender): the `gpu`-marked tests of
   tests/unit/rollout/test_broadcast_transfer.py. Needs two GPUs (NCCL refuses two ranks on one) and vLLM (its
   `PyNcclCommunicator`); skipped, with the reason, without them.

Dry run (`--dry-run`, or no CUDA): every check is listed with what it would run and marked skipped, with the
reason; exit 0. CI runs the dry run (tests/unit/test_gpu_check.py), so the script at least imports and plans.
Exit status: 0 when nothing failed (skips included), 1 when a check failed.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

BF16_LOGIT_TOLERANCE = 5e-2
IPC_BYTES = 256 << 20


class CheckSkipped(Exception):
    """A check this machine cannot run (the message, the reason, goes into the report)."""


@dataclass
class CheckResult:
    name: str
    what: str
    status: str = "skipped"  # "ok" | "FAILED" | "skipped"
    detail: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)


def _cuda(workdir: str) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "memory_GiB": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "devices": torch.cuda.device_count()}


def _bf16_logits(workdir: str) -> dict[str, Any]:
    import torch.distributed as dist

    from megatron_rl.models.tiny import TinySize, make_tiny_model
    from megatron_rl.models.verify import build_loaded_model, hf_logits, megatron_logits, verification_ids
    from megatron_rl.parallel.layout import ParallelLayout
    from megatron_rl.parallel.spawn import free_port
    from megatron_rl.parallel.state import destroy_parallel, init_distributed_from_env

    hf_dir = make_tiny_model("qwen3", os.path.join(workdir, "tiny_qwen3"), size=TinySize(head_dim=64))
    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed_from_env("nccl")
    try:
        arch, chunks = build_loaded_model(hf_dir, ParallelLayout(), dtype="bfloat16")
        ids, _ = verification_ids(hf_dir, arch.vocab_size)
        got = megatron_logits(chunks, ids)
        destroy_parallel()
    finally:
        dist.destroy_process_group()
    want = hf_logits(hf_dir, ids, weights_dtype=torch.bfloat16)
    diff = float((got.float() - want).abs().max())
    numbers = {"max_abs_logit_diff": round(diff, 5), "max_abs_logit": round(float(want.abs().max()), 3),
               "tolerance": BF16_LOGIT_TOLERANCE, "tokens": int(ids.numel())}
    if not diff <= BF16_LOGIT_TOLERANCE:
        raise AssertionError(f"bf16 Megatron logits differ from transformers by {diff} > {BF16_LOGIT_TOLERANCE}")
    return numbers


def _ipc_child(queue, handle, key: str) -> None:
    """The receiving side, as the ipc weight transport's worker opens a bucket (`shared_buffers.open_shared`)."""
    from megatron_rl.rollout.shared_buffers import device_key, open_shared

    device = torch.device("cuda", 0)
    start = time.perf_counter()
    shared = open_shared(handle, device)  # opens the CUDA IPC handle: the parent's memory, no copy
    torch.cuda.synchronize()
    opened = time.perf_counter() - start
    start = time.perf_counter()
    local = shared.clone()
    torch.cuda.synchronize()
    copied = time.perf_counter() - start
    queue.put((float(local.double().sum()), opened, copied, device_key(device) == key))


def _cuda_ipc(workdir: str) -> dict[str, Any]:
    import torch.multiprocessing as mp

    from megatron_rl.rollout.shared_buffers import device_key, share

    device = torch.device("cuda", 0)
    shared = share(IPC_BYTES, device)  # what the ipc transport's sender packs each bucket into
    try:
        shared.tensor.copy_(torch.randint(0, 255, (IPC_BYTES,), dtype=torch.uint8, device=device))
        torch.cuda.synchronize()
        expected = float(shared.tensor.double().sum())
        ctx = mp.get_context("spawn")
        queue = ctx.Queue()
        child = ctx.Process(target=_ipc_child, args=(queue, shared.handle, device_key(device)))
        child.start()
        got, opened, copied, same_key = queue.get(timeout=120)
        child.join(timeout=60)
    finally:
        shared.release()
    if got != expected:
        raise AssertionError(f"the child read a different tensor through CUDA IPC (sum {got} != {expected})")
    if not same_key:
        raise AssertionError("the child files the GPU under another device key (UUID) than the sender")
    return {"MiB": IPC_BYTES >> 20, "open_handle_s": round(opened, 4), "device_copy_s": round(copied, 4),
            "device_copy_GiB_s": round(IPC_BYTES / 2**30 / copied, 1)}


def _train_step_mfu(workdir: str) -> dict[str, Any]:
    from megatron_rl.benchmarks.gpu import gpu_rows

    out = gpu_rows(workdir, size="qwen7b_slice", seq_len=4096, num_sequences=8, spreads=(1,), steps=3, warmup=1)
    run = out["runs"][-1]
    return {**out["peak"][0], **{k: run[k] for k in run if k.startswith(("MFU", "step_s", "model_TFLOP"))}}


def _nccl_transport(workdir: str) -> dict[str, Any]:
    if torch.cuda.device_count() < 2:
        raise CheckSkipped(f"needs two GPUs, this machine has {torch.cuda.device_count()} (NCCL refuses two ranks "
                           "on one GPU)")
    try:
        import vllm.distributed.device_communicators.pynccl  # noqa: F401 - what NcclGroup builds on
    except ImportError as error:
        raise CheckSkipped(f"vLLM is not importable here ({error})") from None
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    test = os.path.join(repo, "tests", "unit", "rollout", "test_broadcast_transfer.py")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", test], cwd=repo, capture_output=True,
                         text=True, timeout=540, check=False)
    summary = (run.stdout.strip().splitlines() or ["(no output)"])[-1]
    if run.returncode != 0 or "passed" not in summary:
        raise AssertionError(f"pytest -m gpu {os.path.relpath(test, repo)}: {summary}\n{run.stdout[-3000:]}"
                             f"{run.stderr[-2000:]}")
    return {"pytest": summary}


CHECKS: list[tuple[str, str, Callable[[str], dict[str, Any]]]] = [
    ("cuda", "CUDA device and build", _cuda),
    ("bf16_logits", "Megatron bf16 logits on one GPU vs transformers (fp32 on bf16-rounded weights), tiny Qwen3",
     _bf16_logits),
    ("cuda_ipc", f"a {IPC_BYTES >> 20} MiB buffer of the ipc transport (shared_buffers.py) read by a second process "
     "through CUDA IPC", _cuda_ipc),
    ("train_step_mfu", "bf16 Megatron train steps on Qwen2.5-7B-shaped layers, MFU vs the measured matmul peak",
     _train_step_mfu),
    ("nccl_transport", "the nccl weight transport between two processes on two GPUs (bucket bit-exact, dead and "
     "idle receivers)", _nccl_transport),
]


def run_checks(workdir: str, dry_run: bool) -> list[CheckResult]:
    results = []
    reason = "dry run" if dry_run else (None if torch.cuda.is_available() else
                                        f"no CUDA device (torch {torch.__version__})")
    for name, what, check in CHECKS:
        result = CheckResult(name, what)
        if reason is not None:
            result.detail = reason
        else:
            print(f"[gpu_check] {name}: {what}", flush=True)
            start = time.perf_counter()
            try:
                result.numbers = check(workdir)
                result.status = "ok"
            except CheckSkipped as why:
                result.detail = str(why)
            except Exception as error:  # noqa: BLE001 - reported, and the next check runs
                result.status = "FAILED"
                result.detail = "".join(traceback.format_exception_only(error)).strip()
                traceback.print_exc()
            result.numbers["seconds"] = round(time.perf_counter() - start, 1)
        results.append(result)
    return results


def report(results: list[CheckResult], dry_run: bool) -> str:
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"# GPU check{' (dry run: nothing ran)' if dry_run else ''}", "",
             f"Date: {now}. Host: {platform.node()}, {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} CPUs. torch {torch.__version__}, CUDA build {torch.version.cuda}.", "",
             "| check | what | status | numbers / reason |", "|---|---|---|---|"]
    for r in results:
        numbers = ", ".join(f"{k}={v}" for k, v in r.numbers.items())
        lines.append(f"| {r.name} | {r.what} | {r.status} | {r.detail or numbers} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", required=True, help="where to write the Markdown report")
    parser.add_argument("--dry-run", action="store_true", help="plan and skip every check (no CUDA needed)")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a new temporary one)")
    args = parser.parse_args(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_check_")
    results = run_checks(workdir, args.dry_run)
    text = report(results, args.dry_run)
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w", encoding="utf-8") as f:
        f.write(text)
    print(text)
    return 1 if any(r.status == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
