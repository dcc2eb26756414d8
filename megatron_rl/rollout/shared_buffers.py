"""A byte buffer one process hands to another on the same machine without sending its bytes: the data plane of the
`ipc` weight transport (docs/rollout.md, "Transports"), where an actor rank hands each packed weight bucket to the
vLLM worker colocated with it.

- GPU: CUDA IPC, as vLLM's own "ipc" weight-transfer backend does (`vllm/distributed/weight_transfer/ipc_engine.py`):
  the handle is `torch.multiprocessing.reductions.reduce_tensor`'s rebuild arguments, opened with vLLM's
  `PackedBufferImporter` (it pairs torch's cross-process refcount with one release). Written against vLLM 0.32, not
  yet run (no GPU here).
- CPU (the twin that runs in CI): a file in /dev/shm (tmpfs: memory, no disk) mapped shared by both sides; the
  handle is its path and size. The receiver's mapping keeps the pages after the sender unlinks the file; the memory
  goes back when both sides have dropped it.

A handle is keyed by the device it lives on (`device_key`): the GPU's UUID (what vLLM keys its IPC handles by: Ray
narrows CUDA_VISIBLE_DEVICES per process, so device indices differ between processes on one GPU), or "cpu".

Reuse, as vLLM's `packed_ipc_producer` reuses one IPC buffer for a whole transfer: a sender takes its buffers from a
`SharedRing` (two, in turn, replaced only by a larger one) and a receiver opens each through an importer that keeps
the last buffer it opened (`importer_for`: vLLM's `PackedBufferImporter` on GPU, `MappedFileImporter` on CPU), so a
transfer of many buckets shares and opens each buffer once, not once per bucket. A receiver must copy what it keeps:
the sender writes a later bucket into the same buffer.

Crash leftovers (CPU): a sender killed while it shares buffers leaves their files (at most two per rank). Each file is
named after its owner, `megatron_rl_ipc_<pid>_<pid namespace>_<n>`, and a process's first CPU buffer first deletes
the files of owners that are gone (`sweep_stale`): ours (same user), from this PID namespace (a pid from another
container's namespace says nothing about liveness here), whose process no longer exists.
"""
from __future__ import annotations

import itertools
import logging
import mmap
import os
from dataclasses import dataclass
from typing import Any

import torch

SHM_DIR = "/dev/shm"
SHM_PREFIX = "megatron_rl_ipc_"
_names = itertools.count()
_swept = False
logger = logging.getLogger(__name__)


def _pid_namespace() -> int | None:
    """This process's PID namespace (the inode of /proc/self/ns/pid), or None where /proc does not say."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def _buffer_path(number: int) -> str:
    return os.path.join(SHM_DIR, f"{SHM_PREFIX}{os.getpid()}_{_pid_namespace() or 0}_{number}")


def sweep_stale(directory: str = SHM_DIR) -> list[str]:
    """Delete the buffer files in `directory` left by senders that are gone (killed while sharing): files of this
    user, named by a process of this PID namespace that no longer exists. A reused pid keeps its files (they leak
    rather than vanish under a live receiver). Returns the deleted names."""
    import psutil

    namespace = _pid_namespace()
    if namespace is None:
        return []
    deleted = []
    for name in os.listdir(directory):
        fields = name[len(SHM_PREFIX):].split("_") if name.startswith(SHM_PREFIX) else []
        if len(fields) != 3 or not all(f.isdigit() for f in fields) or int(fields[1]) != namespace:
            continue
        path = os.path.join(directory, name)
        try:
            if os.lstat(path).st_uid != os.getuid() or psutil.pid_exists(int(fields[0])):
                continue
            os.unlink(path)
        except FileNotFoundError:
            continue
        deleted.append(name)
    if deleted:
        logger.warning("deleted %d shared weight buffer file(s) in %s left by processes that are gone: %s",
                       len(deleted), directory, ", ".join(sorted(deleted)))
    return deleted


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

    @property
    def nbytes(self) -> int:
        return 0 if self.tensor is None else self.tensor.numel()

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
    global _swept
    if not _swept:
        _swept = True
        sweep_stale()  # before the free-space check: what a killed sender left counts against it
    stats = os.statvfs(SHM_DIR)
    free = stats.f_bavail * stats.f_frsize
    if nbytes > free:
        raise RuntimeError(
            f"rollout.transport 'ipc' on CPU shares each weight bucket through {SHM_DIR}, which has "
            f"{free / 2**20:.0f} MiB free; this bucket needs {nbytes / 2**20:.0f} MiB. Lower "
            "rollout.weight_bucket_mb, or give the machine/container more shared memory (docker run --shm-size)")
    path = _buffer_path(next(_names))
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


class SharedRing:
    """`size` reusable shared buffers on `device`, taken in turn: `take(nbytes)` returns (slot, buffer), the slot's
    buffer replaced by a new one only when it is smaller than `nbytes`. Whoever writes into a slot must know its last
    reader is done with it (the ipc sender: the bucket packed there two buckets ago is loaded). `release()` frees them
    all and starts again at slot 0."""

    def __init__(self, device: torch.device | str, size: int = 2):
        self.device = torch.device(device)
        self._buffers: list[SharedBuffer | None] = [None] * size
        self._next = 0

    def take(self, nbytes: int) -> tuple[int, SharedBuffer]:
        slot, self._next = self._next, (self._next + 1) % len(self._buffers)
        buffer = self._buffers[slot]
        if buffer is None or buffer.nbytes < nbytes:
            if buffer is not None:
                buffer.release()
            self._buffers[slot] = None
            buffer = self._buffers[slot] = share(nbytes, self.device)
        return slot, buffer

    def pack(self, tensors: list[torch.Tensor]) -> tuple[int, SharedBuffer]:
        """`tensors` packed (`packed_buckets.pack_into_buffer`) into the next buffer (`take`), written before this
        returns (CUDA: the stream is synchronized, so a receiver may read it at once): (slot, buffer)."""
        from megatron_rl.rollout.packed_buckets import bucket_layout, pack_into_buffer

        size = bucket_layout([t.shape for t in tensors], [t.dtype for t in tensors])[1]
        slot, buffer = self.take(size)
        pack_into_buffer(tensors, self.device, out=buffer.tensor[:size])
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        return slot, buffer

    def release(self) -> None:
        for buffer in self._buffers:
            if buffer is not None:
                buffer.release()
        self._buffers = [None] * len(self._buffers)
        self._next = 0


class MappedFileImporter:
    """The CPU twin of vLLM's `PackedBufferImporter`: keeps the mapping of the last /dev/shm buffer it opened, so the
    buckets a sender packs into one reused buffer map it once; opening another buffer drops the previous mapping
    (its memory goes back once the sender has unlinked the file too)."""

    def __init__(self) -> None:
        self._entry: tuple[tuple, torch.Tensor] | None = None

    def rebuild(self, handle: tuple) -> torch.Tensor:
        key = tuple(handle)
        if self._entry is None or self._entry[0] != key:
            self._entry = None
            self._entry = (key, _map_file(handle))
        return self._entry[1]

    def close(self) -> None:
        self._entry = None


def importer_for(device: torch.device | str) -> Any:
    """A receiver's one-buffer cache of opened handles on `device` (pass it to `open_shared`): vLLM's
    `PackedBufferImporter` on GPU (it also pairs torch's cross-process refcount with one release), `MappedFileImporter`
    on CPU. `close()` lets go of the buffer."""
    if torch.device(device).type == "cuda":
        from vllm.distributed.weight_transfer.packed_tensor import PackedBufferImporter

        return PackedBufferImporter()
    return MappedFileImporter()


def open_shared(handle: tuple, device: torch.device | str, importer: Any = None) -> torch.Tensor:
    """The buffer behind a handle from `share`, as a uint8 tensor on `device` (this process's own device: the same
    GPU as the sender's, or the CPU). `importer` (`importer_for`) keeps it open for the next bucket in the same
    buffer; None opens it once (a one-off receiver, e.g. the GPU check: torch's `rebuild_cuda_tensor` on GPU)."""
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
        return _map_file(handle) if importer is None else importer.rebuild(handle)
    raise ValueError(f"a {kind!r} buffer handle cannot be opened on {device} (the sender and the receiver must be on "
                     "the same device: a colocated engine)")


def _map_file(handle: tuple) -> torch.Tensor:
    """A /dev/shm buffer's pages, mapped shared into this process (the path checked by `open_shared`; a symlink is
    refused): the receiver sees every bucket the sender writes into the buffer later, and the mapping outlives the
    sender's unlink."""
    _, path, nbytes = handle
    if not nbytes:
        return torch.empty(0, dtype=torch.uint8)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    try:
        pages = mmap.mmap(fd, int(nbytes))
    finally:
        os.close(fd)
    return torch.frombuffer(pages, dtype=torch.uint8)  # holds the mapping


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
