"""A byte buffer one process hands to another on the same machine without sending its bytes: the data plane of the
`ipc` weight transport (docs/rollout.md, "Transports"), where an actor rank hands each packed weight bucket to the
vLLM worker colocated with it.

- GPU: CUDA IPC, as vLLM's own "ipc" weight-transfer backend does (`vllm/distributed/weight_transfer/ipc_engine.py`):
  the handle is `torch.multiprocessing.reductions.reduce_tensor`'s rebuild arguments, opened with vLLM's
  `PackedBufferImporter` (it pairs torch's cross-process refcount with one release). Written against vLLM 0.32, not
  yet run (no GPU here).
- CPU (the twin that runs in CI): a file in /dev/shm (tmpfs: memory, no disk) mapped by both sides
  (`torch.from_file`); the handle is its path and size. The receiver's mapping keeps the pages after the sender
  unlinks the file, so tensors viewing it stay valid; the memory goes back when both sides have dropped it.

A handle is keyed by the device it lives on (`device_key`): the GPU's UUID (what vLLM keys its IPC handles by: Ray
narrows CUDA_VISIBLE_DEVICES per process, so device indices differ between processes on one GPU), or "cpu".
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

import torch

SHM_DIR = "/dev/shm"
SHM_PREFIX = "megatron_rl_ipc_"
_names = itertools.count()


def device_key(device: torch.device | str) -> str:
    """The key a handle on `device` is filed under: the GPU's UUID, or "cpu"."""
    device = torch.device(device)
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        return str(torch.cuda.get_device_properties(index).uuid)
    if device.type == "cpu":
        return "cpu"
    raise ValueError(f"no shared buffers on device {device}")


@dataclass
class SharedBuffer:
    """A uint8 buffer this process owns and shares: `tensor` (write into it), `handle` (what the receiver opens).
    `release()` once every receiver has opened it (CPU: unlinks the file; GPU: drops it and collects what the
    receivers have released)."""

    tensor: torch.Tensor | None
    handle: tuple

    def release(self) -> None:
        tensor, self.tensor = self.tensor, None
        if tensor is None:
            return
        if self.handle[0] == "shm":
            _unlink(self.handle[1])
        else:
            del tensor
            torch.cuda.ipc_collect()


def share(nbytes: int, device: torch.device | str) -> SharedBuffer:
    """A new shared buffer of `nbytes` bytes on `device` (contents undefined). CPU: raises, naming the fix, when
    /dev/shm lacks the room (a container's default /dev/shm is 64 MiB: writing past it would kill the process with
    SIGBUS)."""
    device = torch.device(device)
    if device.type == "cuda":
        from torch.multiprocessing.reductions import reduce_tensor

        tensor = torch.empty(nbytes, dtype=torch.uint8, device=device)
        _, args = reduce_tensor(tensor)
        return SharedBuffer(tensor, ("cuda", *args))
    if device.type != "cpu":
        raise ValueError(f"no shared buffers on device {device}")
    stats = os.statvfs(SHM_DIR)
    free = stats.f_bavail * stats.f_frsize
    if nbytes > free:
        raise RuntimeError(
            f"rollout.transport 'ipc' on CPU shares each weight bucket through {SHM_DIR}, which has "
            f"{free / 2**20:.0f} MiB free; this bucket needs {nbytes / 2**20:.0f} MiB. Lower "
            "rollout.weight_bucket_mb, or give the machine/container more shared memory (docker run --shm-size)")
    path = os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getpid()}_{next(_names)}")
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)
    try:
        tensor = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8) if nbytes else \
            torch.empty(0, dtype=torch.uint8)
    except BaseException:
        _unlink(path)
        raise
    return SharedBuffer(tensor, ("shm", path, nbytes))


def open_shared(handle: tuple, device: torch.device | str, importer: Any = None) -> torch.Tensor:
    """The buffer behind a handle from `share`, as a uint8 tensor on `device` (this process's own device: the same
    GPU as the sender's, or the CPU). GPU: `importer` is the receiver's vLLM `PackedBufferImporter` (one per
    receiving engine); None opens it with torch's `rebuild_cuda_tensor` (a one-off receiver, e.g. the GPU check)."""
    device = torch.device(device)
    kind = handle[0] if handle else None
    if kind == "cuda" and device.type == "cuda":
        args = list(handle[1:])
        args[6] = device.index if device.index is not None else torch.cuda.current_device()  # the receiver's index
        if importer is None:
            from torch.multiprocessing.reductions import rebuild_cuda_tensor

            return rebuild_cuda_tensor(*args)
        return importer.rebuild(args)
    if kind == "shm" and device.type == "cpu":
        _, path, nbytes = handle
        if os.path.dirname(path) != SHM_DIR or not os.path.basename(path).startswith(SHM_PREFIX):
            raise ValueError(f"refusing to map {path!r}: shared weight buffers are {SHM_DIR}/{SHM_PREFIX}* files")
        if not nbytes:
            return torch.empty(0, dtype=torch.uint8)
        return torch.from_file(path, shared=False, size=int(nbytes), dtype=torch.uint8)
    raise ValueError(f"a {kind!r} buffer handle cannot be opened on {device} (the sender and the receiver must be on "
                     "the same device: a colocated engine)")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
