"""Run a function on N local ranks joined by a gloo process group, and collect each rank's result.

Used by the multi-rank tests (which compare a parallel run with a single-process reference) and by tools
that need a small CPU world without torchrun (`megatron-rl verify-model`). Each rank is a fresh `spawn`ed
interpreter, so no CUDA/megatron global state leaks between ranks or from the parent.

    results = spawn_ranks(my_fn, world_size=2, args=(cfg,))   # results[r] = my_fn(*args) on rank r

`my_fn` must be importable by name (a module-level function). Results travel back pickled, so return
plain data or CPU tensors. A rank that raises makes `spawn_ranks` raise `RankFailedError` with that rank's
traceback; the other ranks are killed (no orphan processes, no hang on a half-dead collective).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, Sequence


class RankFailedError(RuntimeError):
    """A spawned rank raised, died or timed out; the message carries its traceback."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank, world_size, port, args, kwargs, env, threads, results):
    os.environ.update(env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    import torch
    import torch.distributed as dist

    if threads:
        torch.set_num_threads(threads)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        out = fn(*args, **kwargs)
        payload = ("ok", pickle.dumps(out))
    except BaseException:  # noqa: BLE001 - everything must reach the parent, including SystemExit
        payload = ("error", traceback.format_exc())
    try:
        results.put((rank, payload))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - teardown after a failure may itself fail
                pass


def spawn_ranks(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    kwargs: dict | None = None,
    *,
    timeout: float = 600.0,
    env: dict[str, str] | None = None,
    threads_per_rank: int | None = 1,
) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the results ordered by rank.

    threads_per_rank: torch intra-op threads per rank (1 keeps N ranks from oversubscribing small machines;
    None leaves torch's default).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    base_env = {"OMP_NUM_THREADS": str(threads_per_rank)} if threads_per_rank else {}
    base_env.update(env or {})
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(fn, r, world_size, port, tuple(args), dict(kwargs or {}), base_env, threads_per_rank, results),
            daemon=False,
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RankFailedError(
                    f"timed out after {timeout:.0f}s waiting for ranks {sorted(set(range(world_size)) - set(out))}"
                )
            try:
                rank, (status, data) = results.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [r for r, p in enumerate(procs) if r not in out and p.exitcode not in (None, 0)]
                if dead:
                    raise RankFailedError(
                        f"rank {dead[0]} exited with code {procs[dead[0]].exitcode} before reporting a result "
                        "(killed by a signal or out of memory? or the launching script lacks an `if __name__ == '__main__':` "
                        "guard, so each spawned rank re-ran it: see its stderr)"
                    ) from None
                continue
            if status == "error":
                raise RankFailedError(f"rank {rank} of {world_size} failed:\n{data}")
            out[rank] = pickle.loads(data)
    finally:
        for p in procs:
            p.join(timeout=5 if len(out) == world_size else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        results.close()
    return [out[r] for r in range(world_size)]
