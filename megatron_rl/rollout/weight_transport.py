"""How one weight update travels from the trainer (the pool's owner, global rank 0) to every engine.

The pool's update loop (`RolloutPool.update_weights`) is the same for every transport:

    for engine: engine.begin_weight_update(version)
    for bucket in buckets:                       # lists of (hf_name, full tensor) from export_hf_weights(dst=0)
        refs = transport.send_bucket(bucket, engines)
    for engine: engine.finish_weight_update()    # finalize, MoE fix, reset the prefix cache
    transport.commit()                           # this update is now "the current weights"

and a restarted engine gets the current weights with `transport.replay(engine)` between a begin and a finish.
A transport has two halves that share a name: the sender (a `WeightTransport` here, in the trainer process) and the
receiver (`receive_bucket(name, payload)`, called inside each vLLM worker by the worker extension, where it turns
the payload into (hf_name, tensor) pairs for `model.load_weights`).

Implemented here: "object_store" (CPU, and any device as a fallback). Interface points for the GPU transports are
named below; they raise NotImplementedError until they are written and tested on GPUs.
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

Bucket = Sequence[tuple[str, torch.Tensor]]

# torch dtypes numpy cannot hold: sent as a same-width integer view and viewed back on receipt.
_VIEW_AS = {torch.bfloat16: torch.int16, torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.uint8}


@dataclass
class PackedBucket:
    """One bucket as numpy arrays (zero-copy through Ray's object store) plus what is needed to rebuild tensors."""

    names: list[str]
    dtypes: list[str]  # torch dtype names, e.g. "bfloat16"
    arrays: list[np.ndarray]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


def pack_bucket(bucket: Bucket) -> PackedBucket:
    """(hf_name, tensor) pairs -> PackedBucket. Shares memory with CPU tensors (no copy); GPU tensors are copied."""
    names, dtypes, arrays = [], [], []
    for name, tensor in bucket:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"a bucket holds (hf_name: str, tensor) pairs, got ({type(name).__name__}, "
                            f"{type(tensor).__name__})")
        t = tensor.detach().to("cpu").contiguous()
        dtype = t.dtype
        if dtype in _VIEW_AS:
            t = t.view(_VIEW_AS[dtype])
        names.append(name)
        dtypes.append(str(dtype).removeprefix("torch."))
        arrays.append(t.numpy())
    return PackedBucket(names, dtypes, arrays)


def unpack_bucket(packed: PackedBucket) -> list[tuple[str, torch.Tensor]]:
    """PackedBucket -> (hf_name, tensor) pairs viewing the arrays' memory (read-only when they come from Ray)."""
    out = []
    with warnings.catch_warnings():
        # Arrays from Ray's object store are read-only views; the tensors are only read (copied into parameters).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, dtype_name, array in zip(packed.names, packed.dtypes, packed.arrays):
            dtype = getattr(torch, dtype_name)
            tensor = torch.from_numpy(array)
            if dtype in _VIEW_AS:
                tensor = tensor.view(dtype)
            out.append((name, tensor))
    return out


class WeightTransport(ABC):
    """Sender half of a transport. `engines` are the engines' Ray actor handles (`RolloutEngine`)."""

    name: ClassVar[str]

    @abstractmethod
    def send_bucket(self, bucket: Bucket, engines: Sequence[Any]) -> list[Any]:
        """Start delivering and loading one bucket on every engine; returns one Ray ObjectRef per engine that
        resolves (to the number of tensors loaded) once that engine has loaded the bucket."""

    @abstractmethod
    def commit(self) -> None:
        """The buckets sent since the last commit are a complete update: they become the current weights."""

    @abstractmethod
    def discard(self) -> None:
        """The buckets sent since the last commit are abandoned (the update failed); keep the current weights."""

    @abstractmethod
    def replay(self, engine: Any) -> list[Any]:
        """Send the current (last committed) weights to one engine; ObjectRefs as in `send_bucket`.
        Called for a restarted engine, between its begin and finish of a weight update."""

    @property
    @abstractmethod
    def has_weights(self) -> bool:
        """Whether an update was ever committed (else engines run the checkpoint they started from)."""

    def close(self) -> None:
        """Release what the transport holds."""


class ObjectStoreTransport(WeightTransport):
    """Buckets as numpy arrays through Ray's object store: one `ray.put` per bucket, read zero-copy by every
    engine on the node. The last committed update stays in the object store (one host-memory copy of the model)
    so that a restarted engine can be given the current weights without asking the trainer again."""

    name = "object_store"

    def __init__(self):
        self._pending: list[Any] = []
        self._current: list[Any] = []

    def send_bucket(self, bucket: Bucket, engines: Sequence[Any]) -> list[Any]:
        import ray

        ref = ray.put(pack_bucket(bucket))
        self._pending.append(ref)
        return [engine.load_bucket.remote(self.name, ref) for engine in engines]

    def commit(self) -> None:
        self._current, self._pending = self._pending, []

    def discard(self) -> None:
        self._pending = []

    def replay(self, engine: Any) -> list[Any]:
        return [engine.load_bucket.remote(self.name, ref) for ref in self._current]

    @property
    def has_weights(self) -> bool:
        return bool(self._current)

    def close(self) -> None:
        self._pending, self._current = [], []


def nccl_broadcast_transport() -> WeightTransport:
    """GPU, trainer and engines on separate GPUs: NCCL broadcast from trainer rank 0 to every engine worker.

    Not implemented (needs CUDA GPUs to write and test; nothing here pretends to work). The missing pieces:
    - setup: one NCCL group {trainer rank 0} + all TP workers of all engines. vLLM 0.32 ships this as
      `vllm.distributed.weight_transfer` backend "nccl": engines start with
      `LLM(weight_transfer_config=WeightTransferConfig(backend="nccl"))`, the trainer side joins with
      `NCCLTrainerWeightTransferEngine`, the engine side with `llm.init_weight_transfer_engine(...)`;
    - send_bucket: an engine actor call carrying only (names, dtypes, shapes) that makes every worker post its
      receive, then the trainer broadcasts the bucket's tensors (packed into one flat buffer);
    - receive_bucket("nccl", metadata) in the worker: allocate, receive, return the (name, tensor) pairs;
    - replay: not possible from the engines alone; the pool must ask the trainer to re-export (or keep a pinned
      host copy).
    """
    raise NotImplementedError(
        "the 'nccl' weight transport is not implemented yet: it needs CUDA GPUs and the NCCL group described in "
        "megatron_rl.rollout.weight_transport.nccl_broadcast_transport; use transport='object_store' (it works on "
        "GPU too, through host memory)"
    )


def cuda_ipc_transport() -> WeightTransport:
    """GPU, colocated (trainer and engine share GPUs): CUDA IPC handles of the bucket's tensors.

    Not implemented (needs CUDA GPUs). The missing pieces: send_bucket flattens the bucket into one CUDA buffer,
    shares it with `torch.multiprocessing.reductions.reduce_tensor` and passes the handle (a few bytes) through Ray;
    `receive_bucket("cuda_ipc", handle)` in the worker on the same GPU rebuilds the tensor and views it per name;
    the trainer frees the buffer after every engine acknowledged the bucket. vLLM 0.32's weight_transfer backend
    "ipc" implements the same idea.
    """
    raise NotImplementedError(
        "the 'cuda_ipc' weight transport is not implemented yet: it needs colocated CUDA GPUs (see "
        "megatron_rl.rollout.weight_transport.cuda_ipc_transport); use transport='object_store'"
    )


# name -> factory of the sender half. The GPU entries name their missing pieces in their docstrings.
TRANSPORTS: dict[str, Callable[[], WeightTransport]] = {
    ObjectStoreTransport.name: ObjectStoreTransport,
    "nccl": nccl_broadcast_transport,
    "cuda_ipc": cuda_ipc_transport,
}


def make_transport(name: str) -> WeightTransport:
    """The sender half of transport `name` (raises before any engine starts for unknown/unimplemented ones)."""
    if name not in TRANSPORTS:
        raise ValueError(f"rollout.transport: unknown transport {name!r}; use one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name]()


def receive_bucket(name: str, payload: Any) -> list[tuple[str, torch.Tensor]]:
    """Receiver half, run inside a vLLM worker: the payload of transport `name` -> (hf_name, tensor) pairs."""
    if name == ObjectStoreTransport.name:
        if not isinstance(payload, PackedBucket):
            raise TypeError(f"transport 'object_store' expects a PackedBucket payload, got {type(payload).__name__}")
        return unpack_bucket(payload)
    raise NotImplementedError(f"no receiver for weight transport {name!r} in this build")
