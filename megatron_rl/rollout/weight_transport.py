"""How one weight update travels from the trainer (the pool's owner) to every engine.

Every transport goes through vLLM's weight-transfer framework (`weight_transfer_engines.py`): the engines' workers
run a registered `WeightTransferEngine` and the update is vLLM's worker lifecycle `start_weight_update` ->
`update_weights` per bucket -> `finish_weight_update` (layerwise reload, in place). The pool's loop
(`RolloutPool.update_weights`) is the same for every transport:

    for engine: engine.begin_weight_update(version)         # vLLM start_weight_update
    for bucket in buckets:                                   # lists of (hf_name, full tensor)
        refs = transport.send_bucket(bucket, engines)        # vLLM update_weights on every engine
    for engine: engine.finish_weight_update()                # vLLM finish_weight_update, prefix-cache reset
    transport.commit()                                       # this update is now "the current weights"

and a restarted engine is brought to the current weights with `transport.replay(engine, version)`.

- "gloo" (default): per engine a gloo process group with the sender; per bucket the engine is told names, dtypes
  and shapes and the sender broadcasts one packed buffer (vLLM's dense-NCCL choreography on gloo). The sender keeps
  references to the committed buckets (no copy) to replay them to a restarted engine.
- "object_store": each bucket as numpy arrays in Ray's object store (one `ray.put`, read zero-copy by the engines
  of a node); kept as the transport that needs no network path from the sender to the engines' workers (any Ray
  cluster reaches them), measured against gloo in docs/rollout.md.
- "nccl", "cuda_ipc": vLLM's own backends "nccl" / "ipc" on GPU; not wired here (no GPU to run them): refused.
"""
from __future__ import annotations

import logging
import warnings
from functools import partial
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

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


LOST, RAISED = "lost", "raised"  # an engine gone (restart it) / an engine that raised a real error (fail the update)


class WeightOwners(ABC):
    """The trainer's ranks that send their own shares of the weights straight to the engines (owner sends,
    rollout/owner_sender.py; `ActorGroup.weight_owners()`). The pool opens and closes the update on every engine
    around `send` and remembers the owners of the committed update to `replay` it to a restarted engine."""

    @abstractmethod
    def send(self, engines: Sequence[Any]) -> dict[str, Any]:
        """Every owner's share of one update to every engine (their calls between the pool's begin and finish);
        {"failed": {engine index: (LOST | RAISED, message)}, "buckets", "tensors", "bytes"}."""

    @abstractmethod
    def conclude(self, committed: bool) -> None:
        """The update the last `send` started was committed (it is what `replay` sends from now on) or abandoned."""

    @abstractmethod
    def replay(self, engine: Any) -> None:
        """The last committed update's buckets to one restarted engine, whose update the pool has opened."""


class WeightTransport(ABC):
    """Sender half of a transport. `engines` are the engines' Ray actor handles (`RolloutEngine`).

    Every transport keeps the buckets sent since the last commit (`_pending`, in whatever form it needs to send them
    again) and the last committed update (`_current`), from which `replay` serves a restarted engine.
    timeout_s: how long one engine's part of a transfer may take (`RolloutPoolConfig.weight_sync_timeout_s`)."""

    name: ClassVar[str]

    def __init__(self, timeout_s: float = 600.0):
        self.timeout_s = timeout_s
        self._pending: list[Any] = []
        self._current: list[Any] = []

    @abstractmethod
    def send_bucket(self, bucket: Bucket, engines: Sequence[Any]) -> list[Any]:
        """Start delivering and loading one bucket on every engine; returns one Ray ObjectRef per engine that
        resolves (to the number of tensors loaded) once that engine has loaded the bucket, or None for an engine
        the transport gave up on in this update (unreachable, or it failed a transfer): the pool replaces it."""

    def commit(self) -> None:
        """The buckets sent since the last commit are a complete update: they become the current weights."""
        self._current, self._pending = self._pending, []

    def discard(self) -> None:
        """The buckets sent since the last commit are abandoned (the update failed); keep the current weights."""
        self._pending = []

    @abstractmethod
    def replay(self, engine: Any, version: int) -> list[Any]:
        """Bring a restarted engine to the current (last committed) weights, `version`: a whole update (begin,
        buckets, finish). Returns ObjectRefs to wait for (the last resolves to finish_weight_update's counts)."""

    @property
    def has_weights(self) -> bool:
        """Whether an update was ever committed (else engines run the checkpoint they started from)."""
        return bool(self._current)

    def forget(self, engine: Any) -> None:
        """An engine is being replaced: release what the transport holds for it (nothing by default)."""

    def close(self) -> None:
        """Release what the transport holds."""
        self._pending, self._current = [], []


class ObjectStoreTransport(WeightTransport):
    """Buckets as numpy arrays through Ray's object store: one `ray.put` per bucket, read zero-copy by every
    engine on the node. The last committed update stays in the object store (one host-memory copy of the model)
    so that a restarted engine can be given the current weights without asking the trainer again."""

    name = "object_store"

    def send_bucket(self, bucket: Bucket, engines: Sequence[Any]) -> list[Any]:
        import ray

        ref = ray.put(pack_bucket(bucket))
        self._pending.append(ref)
        return [engine.load_bucket.remote(self.name, ref) for engine in engines]

    def replay(self, engine: Any, version: int) -> list[Any]:
        return [engine.begin_weight_update.remote(version),
                *[engine.load_bucket.remote(self.name, ref) for ref in self._current],
                engine.finish_weight_update.remote()]


class GlooTransport(WeightTransport):
    """The "megatron_rl_gloo" backend's sender: one `GlooTrainerWeightTransferEngine` per engine (its own group, so
    an engine that dies breaks only its own), all engines sent to in parallel threads. A broadcast that fails (the
    engine died, or did not receive within the timeout) drops that engine's group; its `load_bucket` call then
    fails or times out and the pool restarts it (`replay` builds a new group)."""

    name = "gloo"

    def __init__(self, timeout_s: float = 600.0):
        super().__init__(timeout_s)
        self._senders: dict[Any, Any] = {}  # engine actor id -> GlooTrainerWeightTransferEngine
        self._failed: set[Any] = set()  # engines lost during the open update: not sent to again until it ends
        self._threads = None

    def _sender(self, engine: Any, *, version: int = 0, source: list[Bucket] | None = None):
        """This engine's sender, connected on first use (the group's TCP store on this node's Ray address: loopback
        on a local cluster). version and source: what its `send_weights` installs (a replay)."""
        key = engine._actor_id
        if key not in self._senders:
            import ray
            from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

            from megatron_rl.rollout.weight_transfer_engines import GlooTrainerInitInfo, register_backends

            register_backends()
            workers = ray.get(engine.num_workers.remote(), timeout=self.timeout_s)
            self._senders[key] = WeightTransferTrainerFactory.trainer_init(
                GlooTrainerInitInfo(master_address=ray.util.get_node_ip_address(), num_workers=workers,
                                    timeout_s=self.timeout_s, rank=0),
                client=_EngineClient(engine, self.timeout_s, version), source=source)
        return self._senders[key]

    def _drop(self, engine: Any) -> None:
        sender = self._senders.pop(engine._actor_id, None)
        if sender is not None:
            sender.shutdown()

    def forget(self, engine: Any) -> None:
        self._drop(engine)

    def _connected(self, engine: Any):
        """This engine's sender, or None when the engine is given up on in the open update."""
        if engine._actor_id in self._failed:
            return None
        try:
            return self._sender(engine)
        except Exception as error:  # noqa: BLE001 - this engine is lost: the pool replaces it
            logger.warning("gloo weight transfer: cannot connect to an engine: %s", error)
            self._failed.add(engine._actor_id)
            return None

    def send_bucket(self, bucket: Bucket, engines: Sequence[Any]) -> list[Any]:
        from concurrent.futures import ThreadPoolExecutor

        from megatron_rl.rollout.weight_transfer_engines import pack_into_buffer, update_info

        if self._threads is None:
            self._threads = ThreadPoolExecutor(max_workers=max(2, len(engines)), thread_name_prefix="gloo-sender")
        bucket = [(name, tensor.detach().to("cpu")) for name, tensor in bucket]
        info = update_info(bucket)
        senders = list(self._threads.map(self._connected, engines))  # in parallel: a hung engine delays no other
        refs = [engine.load_bucket.remote(self.name, info) if sender is not None else None
                for engine, sender in zip(engines, senders)]
        buffer = pack_into_buffer([t for _, t in bucket]) if any(senders) else None  # one copy for all engines
        futures = [self._threads.submit(sender.send_packed, buffer, partial(_finished, ref)) if sender is not None
                   else None for sender, ref in zip(senders, refs)]
        for engine, future in zip(engines, futures):
            if future is None:
                continue
            try:
                future.result()
            except Exception as error:  # noqa: BLE001 - the pool sees this engine's call fail and restarts it
                logger.warning("gloo weight transfer to an engine failed: %s", error)
                self._failed.add(engine._actor_id)
                self._drop(engine)
        self._pending.append(bucket)
        return refs

    def commit(self) -> None:
        super().commit()
        self._failed = set()

    def discard(self) -> None:
        super().discard()
        self._failed = set()

    def replay(self, engine: Any, version: int) -> list[Any]:
        self._drop(engine)
        self._sender(engine, version=version, source=self._current).send_weights()
        return [engine.info.remote()]

    def close(self) -> None:
        for key in list(self._senders):
            self._senders.pop(key).shutdown()
        if self._threads is not None:
            self._threads.shutdown(wait=False)
            self._threads = None
        super().close()


def _finished(ref) -> bool:
    """Whether a Ray call has ended (returned or raised)."""
    import ray

    return bool(ray.wait([ref], timeout=0)[0])


def is_engine_failure(error: BaseException) -> bool:
    """Errors that mean "this engine is gone": restart it. Anything else is a real error and propagates."""
    from ray.exceptions import RayActorError, RayTaskError

    if isinstance(error, RayActorError):
        return True
    if isinstance(error, RayTaskError):
        return type(getattr(error, "cause", None)).__name__ == "EngineDeadError"
    return False


def first_error(refs: Sequence[Any]) -> BaseException | None:
    """The error of the first of these finished Ray calls that raised, if any."""
    import ray

    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except Exception as error:  # noqa: BLE001 - returned to the caller
            return error
    return None


class _EngineClient:
    """vLLM's `VLLMWeightSyncClient` protocol over one `RolloutEngine` Ray actor (blocking calls, each bounded by
    the timeout). `version` is the weights version a whole `send_weights` update installs."""

    def __init__(self, engine: Any, timeout_s: float, version: int = 0):
        self.engine, self.timeout_s, self.version = engine, timeout_s, version

    def _get(self, ref):
        import ray

        return ray.get(ref, timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._get(self.engine.init_weight_transfer.remote(init_info))

    def start_weight_update(self) -> None:
        self._get(self.engine.begin_weight_update.remote(self.version))

    def update_weights(self, update_info: dict) -> None:
        self._get(self.engine.load_bucket.remote(GlooTransport.name, update_info))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._get(self.engine.finish_weight_update.remote())


def _not_wired(name: str, backend: str) -> Callable[..., WeightTransport]:
    def refuse(**_options) -> WeightTransport:
        raise NotImplementedError(
            f"rollout.transport={name!r}: vLLM's {backend!r} weight-transfer backend needs CUDA GPUs and is not wired "
            "into the pool yet (no GPU to run it here); use 'gloo' (the same choreography over TCP) or 'object_store'"
        )

    return refuse


# name -> factory of the sender half (pool side); the worker halves are in weight_transfer_engines.py.
TRANSPORTS: dict[str, Callable[..., WeightTransport]] = {
    GlooTransport.name: GlooTransport,
    ObjectStoreTransport.name: ObjectStoreTransport,
    "nccl": _not_wired("nccl", "nccl"),
    "cuda_ipc": _not_wired("cuda_ipc", "ipc"),
}

# transport -> the vLLM weight-transfer backend its engines run
BACKENDS = {"gloo": "megatron_rl_gloo", "object_store": "megatron_rl_object_store"}


def make_transport(name: str, *, timeout_s: float = 600.0) -> WeightTransport:
    """The sender half of transport `name` (raises before any engine starts for unknown/unwired ones)."""
    if name not in TRANSPORTS:
        raise ValueError(f"rollout.transport: unknown transport {name!r}; use one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](timeout_s=timeout_s)
