"""The GPU check: what only a CUDA machine can verify, in one run of a few minutes, written up as one Markdown report.

    bash tools/gpu_check.sh --report tools/GPU_CHECK.md        # on a GPU machine (CUDA torch + megatron-core)
    bash tools/gpu_check.sh --dry-run --report /tmp/plan.md    # anywhere: import everything, plan, skip every check

Checks, in order (each one's result, numbers and any error go into the report; a failure does not stop the rest):
1. `cuda`: the device, its memory and the torch / CUDA build.
2. `bf16_logits`: a tiny Qwen3 built by the Megatron actor's model builder in bf16 on one GPU (one nccl rank), its
   logits against transformers' fp32 forward of the same bf16-rounded weights (`models/verify.py`). bf16 keeps ~3
   significant digits, so the bar is a max |logit diff| of 5e-2 on logits of magnitude ~1-10 (fp32 on CPU: 1e-4).
   `fp32_logits`: the same in fp32 (what the quickstart's actor computes in), which under Transformer Engine runs our
   SDPA core attention inside TE's spec (`models/builder.uses_torch_core_attention`); bar 1e-2, since a GPU may run
   fp32 GEMMs in TF32.
3. `cuda_ipc`: the ipc weight transport's data plane between two processes on one GPU (`ipc_roundtrip`), with the
   transport's own code: the parent packs two mixed-dtype 256 MiB buckets in turn into one reused shared buffer
   (`rollout/packed_buckets.py`, `rollout/shared_buffers.py`: torch's `reduce_tensor`, the mechanism of vLLM's
   `ipc` backend), a spawned child opens the handle once, views and clones each bucket's tensors as the
   transport's worker does; bit-exact per tensor (the second bucket through the mapping opened for the first), the
   same device key (UUID) on both sides, and the buffer freed once the child let go. The report gives the times to
   pack, open the handle, and view and clone. CI runs the same function on CPU (the
   /dev/shm twin, tests/unit/rollout/test_shared_buffers.py).
4. `train_step_mfu`: bf16 train steps of the Megatron actor on a stack of Qwen2.5-7B-shaped layers (hidden 3584, 28
   heads of 128, 4 KV heads, MLP 18944; `benchmarks/models.py` "qwen7b_slice") and the MFU against the measured
   matmul peak (`benchmarks/gpu.py`).
5. `nccl_transport`: the nccl weight transport's data plane between two processes on two GPUs (our `NcclGroup` and
   trainer engine: a bucket bit-exact, a receiver that dies or idles releases the sender): the `gpu`-marked tests of
   tests/unit/rollout/test_broadcast_transfer.py. Needs two GPUs (NCCL refuses two ranks on one) and vLLM (its
   `PyNcclCommunicator`); skipped, with the reason, without them.

The report is written again after every check, with the checks not yet run marked "not reached": a run stopped by a
time limit (the lent GPU machines allow 10 minutes a command) or a crash still leaves what it measured. For the same
reason `cuda_ipc` fails at once when its receiving process dies, and after 2 minutes when it stays silent.

Dry run (`--dry-run`, or no CUDA): every check is listed with what it would run and marked skipped, with the
reason; exit 0. CI runs the dry run (tests/unit/test_gpu_check.py), so the script at least imports and plans.
Exit status: 0 when nothing failed (skips included), 1 when a check failed.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import platform
import queue
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

BF16_LOGIT_TOLERANCE = 5e-2
FP32_LOGIT_TOLERANCE = 1e-2  # CPU holds 1e-4; a GPU may run fp32 GEMMs in TF32 (10 mantissa bits)
IPC_BYTES = 256 << 20
IPC_REPLY_TIMEOUT_S = 120  # a 256 MiB bucket takes well under a second; the child's start (imports) is most of it


class CheckSkipped(Exception):
    """A check this machine cannot run (the message, the reason, goes into the report)."""


@dataclass
class CheckResult:
    name: str
    what: str
    status: str = "skipped"  # "ok" | "FAILED" | "skipped" | "not reached"
    detail: str = ""
    numbers: dict[str, Any] = field(default_factory=dict)


def _cuda(workdir: str) -> dict[str, Any]:
    props = torch.cuda.get_device_properties(0)
    return {"gpu": props.name, "memory_GiB": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "cuda": torch.version.cuda, "devices": torch.cuda.device_count()}


def _logits(workdir: str, dtype: str, tolerance: float) -> dict[str, Any]:
    """A tiny Qwen3 built by the actor's model builder in `dtype` on one GPU, its logits against transformers' fp32
    forward of the same weights rounded to `dtype` (the bar: max |logit diff| <= tolerance)."""
    import torch.distributed as dist

    from megatron_rl.models.tiny import TinySize, make_tiny_model
    from megatron_rl.models.verify import build_loaded_model, hf_logits, megatron_logits, verification_ids
    from megatron_rl.parallel.layout import ParallelLayout
    from megatron_rl.parallel.spawn import free_port
    from megatron_rl.parallel.state import destroy_parallel, init_distributed_from_env

    hf_dir = os.path.join(workdir, "tiny_qwen3")
    if not os.path.isdir(hf_dir):
        make_tiny_model("qwen3", hf_dir, size=TinySize(head_dim=64))
    os.environ["MASTER_PORT"] = str(free_port())
    init_distributed_from_env("nccl")
    try:
        arch, chunks = build_loaded_model(hf_dir, ParallelLayout(), dtype=dtype)
        ids, _ = verification_ids(hf_dir, arch.vocab_size)
        got = megatron_logits(chunks, ids)
        destroy_parallel()
    finally:
        dist.destroy_process_group()
    want = hf_logits(hf_dir, ids, weights_dtype=getattr(torch, dtype))
    diff = float((got.float() - want).abs().max())
    numbers = {"max_abs_logit_diff": round(diff, 6), "max_abs_logit": round(float(want.abs().max()), 3),
               "tolerance": tolerance, "tokens": int(ids.numel())}
    if not diff <= tolerance:
        raise AssertionError(f"{dtype} Megatron logits differ from transformers by {diff} > {tolerance}")
    return numbers


def _bf16_logits(workdir: str) -> dict[str, Any]:
    return _logits(workdir, "bfloat16", BF16_LOGIT_TOLERANCE)


def _fp32_logits(workdir: str) -> dict[str, Any]:
    return _logits(workdir, "float32", FP32_LOGIT_TOLERANCE)


def _digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes (copied to the host)."""
    return hashlib.sha256(tensor.detach().contiguous().view(torch.uint8).cpu().numpy()).hexdigest()


def _ipc_bucket(nbytes: int, device: torch.device, seed: int) -> list[tuple[str, torch.Tensor]]:
    """A weight bucket of about `nbytes` on `device`, mixed dtypes and odd sizes (so the 64-byte alignment of the
    packed layout matters), from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    rows = max(1, nbytes // (2 * 4096 * 2))  # two bf16 [rows, 4096] matrices make up the size
    bucket = [("layers.0.mlp.weight", torch.randn(rows, 4096, generator=generator).to(torch.bfloat16)),
              ("layers.0.norm.weight", torch.randn(4099, generator=generator)),
              ("layers.1.mlp.weight", torch.randn(rows, 4096, generator=generator).to(torch.bfloat16)),
              ("layers.1.norm.weight", torch.randn(3, 5, generator=generator).to(torch.float16)),
              ("positions", torch.arange(7) + seed)]
    return [(name, tensor.to(device)) for name, tensor in bucket]


def _ipc_child(inbox, outbox, device: str, key: str) -> None:
    """The receiving side, as the ipc transport's worker takes buckets (`IpcWeightTransferEngine.receive_weights`),
    until it is sent None: open a handle (`shared_buffers.open_shared`) and keep it open while the next bucket comes
    in the same buffer (the worker's importer does), view the tensors in place (`packed_buckets.views_of_buffer`) and
    clone them; at the end let go of the buffer, as the worker does at the end of an update, so the sender can free
    it."""
    from megatron_rl.rollout.packed_buckets import copies_from_buffer, dtypes_of
    from megatron_rl.rollout.shared_buffers import device_key, open_shared

    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    held, buffer, opens = None, None, 0
    while (item := inbox.get(timeout=IPC_REPLY_TIMEOUT_S)) is not None:
        handle, metadata = item
        start = time.perf_counter()
        if handle != held:
            buffer = None  # let go of the previous buffer first
            buffer, held = open_shared(handle, device), handle  # CUDA: opens the IPC handle, the sender's memory
            opens += 1
        sync()
        opened = time.perf_counter() - start
        start = time.perf_counter()
        tensors = copies_from_buffer(buffer, metadata["shapes"], dtypes_of(metadata["dtype_names"]))
        sync()
        copied = time.perf_counter() - start
        outbox.put(([_digest(tensor) for tensor in tensors], opened, copied, device_key(device) == key, opens))
        del tensors
    del buffer
    sync()
    outbox.put("let go")


def _reply(outbox, child, timeout_s: float = IPC_REPLY_TIMEOUT_S):
    """The child's next message; raises at once when the child has died (a crash in the CUDA IPC open would otherwise
    cost the whole timeout of a run with a 10-minute limit), or after `timeout_s` without one."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return outbox.get(timeout=1)
        except queue.Empty:
            if not child.is_alive():
                raise AssertionError(f"the receiving process died (exit code {child.exitcode}) before it answered")
            if time.monotonic() > deadline:
                raise AssertionError(f"the receiving process did not answer within {timeout_s} s") from None


def ipc_roundtrip(device: torch.device | str, nbytes: int) -> dict[str, Any]:
    """The ipc transport's data plane between two processes on one device, for two buckets through one reused buffer:
    this process packs each bucket (`_ipc_bucket`) into its shared buffer as `IpcSender` does (`SharedRing`, here of
    one buffer), a spawned child takes them as the worker does (`_ipc_child`, which opens the buffer once). Each
    bucket's tensors must reach the child bit for bit (the second one through the mapping the child opened for the
    first), the child's device key must be the sender's, and once the child has let go, releasing the ring must free
    the buffer (CUDA: the allocated memory is back where it was; CPU: the /dev/shm file is gone). On CPU the same
    code runs the /dev/shm twin (CI tests it there)."""
    import torch.multiprocessing as mp

    from megatron_rl.rollout.packed_buckets import bucket_layout, bucket_metadata
    from megatron_rl.rollout.shared_buffers import SharedRing, device_key

    device = torch.device(device)
    cuda = device.type == "cuda"
    baseline = torch.cuda.memory_allocated(device) if cuda else None
    spawn = mp.get_context("spawn")
    inbox, outbox = spawn.Queue(), spawn.Queue()
    child = spawn.Process(target=_ipc_child, args=(inbox, outbox, str(device), device_key(device)))
    ring = SharedRing(device, size=1)
    handles, rows = [], []
    try:
        child.start()
        for seed in (0, 1):
            bucket = _ipc_bucket(nbytes, device, seed)
            tensors = [tensor for _, tensor in bucket]
            size = bucket_layout([t.shape for t in tensors], [t.dtype for t in tensors])[1]
            start = time.perf_counter()
            _, shared = ring.pack(tensors)  # what IpcSender._prepare does
            packed = time.perf_counter() - start
            inbox.put((shared.handle, bucket_metadata(bucket)))
            digests, opened, copied, same_key, opens = _reply(outbox, child)
            wrong = [name for (name, tensor), got in zip(bucket, digests) if _digest(tensor) != got]
            if wrong:
                raise AssertionError(f"bucket {seed + 1}: the child read other bytes than were packed for {wrong}")
            handles.append(shared.handle)
            rows.append((packed, opened, copied))
            del bucket, tensors
        inbox.put(None)
        if _reply(outbox, child) != "let go":
            raise AssertionError("the receiving process did not let go of the buffer")
        child.join(timeout=60)
    finally:
        ring.release()
        if child.is_alive():
            child.kill()
    if not same_key:
        raise AssertionError("the child files the device under another key (CUDA: the GPU's UUID) than the sender")
    if handles[0] != handles[1] or opens != 1:
        raise AssertionError(f"the two buckets did not share one buffer opened once ({opens} opens)")
    if child.exitcode != 0:
        raise AssertionError(f"the receiving process exited with {child.exitcode}")
    freed = torch.cuda.memory_allocated(device) == baseline if cuda else not os.path.exists(handles[0][1])
    if not freed:
        raise AssertionError("the shared buffer was not freed by releasing the ring after the receiver let go of it")
    (_, first_open, _), (packed, opened, copied) = rows
    return {"MiB": round(size / 2**20, 1), "tensors": len(digests), "buckets": len(rows), "pack_s": round(packed, 4),
            "open_handle_s": round(first_open, 4), "reopen_s": round(opened, 4),
            "view_and_clone_s": round(copied, 4), "view_and_clone_GiB_s": round(size / 2**30 / copied, 1)}


def _cuda_ipc(workdir: str) -> dict[str, Any]:
    return ipc_roundtrip(torch.device("cuda", 0), IPC_BYTES)


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
    ("fp32_logits", "Megatron fp32 logits on one GPU vs transformers: the TE spec with our SDPA core attention (TE "
     "has no fp32 attention for packed sequences)", _fp32_logits),
    ("cuda_ipc", f"two {IPC_BYTES >> 20} MiB buckets of the ipc transport packed in turn into one CUDA IPC buffer and "
     "taken by a second process that opened it once (bit-exact, freed after)", _cuda_ipc),
    ("train_step_mfu", "bf16 Megatron train steps on Qwen2.5-7B-shaped layers, MFU vs the measured matmul peak",
     _train_step_mfu),
    ("nccl_transport", "the nccl weight transport between two processes on two GPUs (bucket bit-exact, dead and "
     "idle receivers)", _nccl_transport),
]


NOT_REACHED = "the run stopped before this check (a time limit or a crash: see the log)"


def run_checks(workdir: str, dry_run: bool,
               after_each: Callable[[list[CheckResult]], None] | None = None) -> list[CheckResult]:
    """Every check in CHECKS order; `after_each(results so far)` after each one (main writes the report there)."""
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
        if after_each is not None:
            after_each(results)
    return results


def report(results: list[CheckResult], dry_run: bool) -> str:
    """The Markdown report of `results`; the checks of CHECKS not among them are listed as "not reached"."""
    done = {r.name for r in results}
    results = [*results, *(CheckResult(name, what, "not reached", NOT_REACHED)
                           for name, what, _ in CHECKS if name not in done)]
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
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)

    def write(results: list[CheckResult]) -> str:
        text = report(results, args.dry_run)
        partial = f"{args.report}.partial"  # replaced in one rename: a reader never sees half a report
        with open(partial, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(partial, args.report)
        return text

    write([])
    results = run_checks(workdir, args.dry_run, after_each=write)
    print(write(results))
    return 1 if any(r.status == "FAILED" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
