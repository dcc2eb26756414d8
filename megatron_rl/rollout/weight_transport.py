"""How one weight update travels to every engine: the senders of the two transports, and who drives them.

Every path goes through vLLM's weight-transfer framework (`weight_transfer_engines.py`): the engines' workers run a
registered `WeightTransferEngine` and an update is vLLM's worker lifecycle `start_weight_update` -> `update_weights`
per bucket -> `finish_weight_update` (layerwise reload, in place). The pool (`RolloutPool.update_weights`) runs the
same choreography whoever sends:

    for engine: engine.begin_weight_update(version)          # vLLM start_weight_update
    owners.send(engines)                                      # every sender: its buckets to every engine
    for engine: engine.finish_weight_update()                 # vLLM finish_weight_update, prefix-cache reset
    owners.conclude(committed)                                # the senders keep the committed buckets

`WeightOwners` are the senders of one update: the actor's owner ranks (owner sends, `ActorGroup.weight_owners()`:
each sends its own share, see docs/rollout.md "Owner sends"), or a stream of buckets sent from this process
(`BucketStream`, the driver: e.g. `ActorGroup.weight_buckets()`, or an HF state dict in tests and benchmarks).
Each sender process runs a `BucketSender` of the pool's transport:
- "gloo" (`GlooSender`, default): per engine a gloo group with this sender; per bucket the engine is told names,
  dtypes and shapes and the sender broadcasts one packed buffer (vLLM's dense-NCCL choreography on gloo);
- "nccl" (`NcclSender`, GPU): the same with NCCL groups, GPU to GPU (weight_transfer_engines.py; not yet run);
- "ipc" (`IpcSender`, colocated engines, every actor rank): each engine worker's colocated actor rank packs every
  whole bucket into a buffer it shares with that worker (CUDA IPC on GPU, /dev/shm on CPU) and the engine loads the
  bucket from there; nothing crosses a network;
- "object_store" (`ObjectStoreSender`, driver only): each bucket as numpy arrays in Ray's object store (one
  `ray.put`, read zero-copy by the engines of a node); needs no network path from the sender to the workers.
A sender keeps the last committed update's buckets (packed) to `replay` them to a restarted engine; the ipc sender
keeps nothing and replays by exporting again (see `IpcSender`).
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, ClassVar, Iterable, Sequence

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


def _checked_bucket(bucket: Bucket, device: torch.device | str | None = "cpu") -> list[tuple[str, torch.Tensor]]:
    """The bucket's (hf_name, tensor) pairs with the tensors on `device` (None: where they are); a TypeError for
    anything else."""
    out = []
    for name, tensor in bucket:
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            raise TypeError(f"a bucket holds (hf_name: str, tensor) pairs, got ({type(name).__name__}, "
                            f"{type(tensor).__name__})")
        out.append((name, tensor.detach() if device is None else tensor.detach().to(device)))
    return out


def pack_bucket(bucket: Bucket) -> PackedBucket:
    """(hf_name, tensor) pairs -> PackedBucket. Shares memory with CPU tensors (no copy); GPU tensors are copied."""
    names, dtypes, arrays = [], [], []
    for name, tensor in _checked_bucket(bucket):
        t = tensor.contiguous()
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
    """The senders of one update: the trainer's ranks that send their own shares straight to the engines (owner
    sends, `ActorGroup.weight_owners()`), or a `BucketStream` from this process. The pool opens and closes the update
    on every engine around `send` and keeps the owners of the committed update to `replay` it to a restarted engine.
    `transport`: the transport (engine backend) they send with."""

    transport: str = "gloo"

    @abstractmethod
    def send(self, engines: Sequence[Any], update_ids: Sequence[int]) -> dict[str, Any]:
        """Every owner's share of one update to every engine (their calls between the pool's begin and finish);
        update_ids[i]: what engines[i]'s begin returned, which every bucket to it names, so that the engine refuses a
        late bucket of an abandoned update instead of counting it into the next one; {"failed": {engine index: (LOST
        | RAISED, message)}, "buckets", "tensors", "bytes"}."""

    @abstractmethod
    def conclude(self, committed: bool) -> None:
        """The update the last `send` started was committed (it is what `replay` sends from now on) or abandoned."""

    @abstractmethod
    def replay(self, engine: Any, update_id: int) -> None:
        """The last committed update's buckets to one restarted engine, whose update (`update_id`) the pool opened."""


class BucketSender(ABC):
    """One process's sender of a transport: its buckets to every engine, per update; the last committed update kept
    (in the form the transport sends) for `replay`. sender_id: this sender's name on the engines ("driver",
    "actor<rank>"); timeout_s: how long one engine's part of a transfer may take (`rollout.weight_sync_timeout_s`)."""

    name: ClassVar[str]
    device: torch.device | str = "cpu"  # where this sender's buckets are prepared
    # False: each sender sends the buckets it owns (`owned_weight_buckets`); True: every actor rank takes every whole
    # bucket (`export_hf_weights(dst=None)`) and keeps none for replays (ipc)
    whole_buckets_on_every_rank: ClassVar[bool] = False

    def __init__(self, sender_id: str = "driver", timeout_s: float = 600.0):
        self.sender_id, self.timeout_s = sender_id, timeout_s
        self._pending: list[Any] = []  # the open update's buckets, prepared (_prepare)
        self._current: list[Any] = []  # the last committed update's

    @abstractmethod
    def _prepare(self, bucket: Bucket) -> Any:
        """The bucket (tensors on `self.device`) in the form this transport sends."""

    def _kept(self, item: Any) -> Any:
        """A prepared bucket as this sender keeps it for replays, once `_start` has returned on every engine
        (itself by default; the nccl sender moves it off the GPU)."""
        return item

    def _start(self, engine: Any, item: Any, update_id: int) -> Any:
        """Deliver one prepared bucket of the engine's update `update_id`; returns the Ray ref of its `load_bucket`
        call. Raises when the transfer itself fails (the engine is gone, did not receive, or raised before
        receiving). By default the prepared bucket is `load_bucket`'s whole payload (object_store, ipc)."""
        return engine.load_bucket.remote(self.name, item, update_id)

    def load_backend(self) -> None:
        """Import what sending needs (nothing by default), so that a caller can do it ahead of the first update."""

    def _start_all(self, engines: dict[int, Any], item: Any, update_ids: Sequence[int]) -> dict[int, Any]:
        """`_start` on every engine: {index: ref, or the exception it raised}."""
        return {i: _outcome(self._start, engine, item, update_ids[i]) for i, engine in engines.items()}

    def send(self, buckets: Iterable[Bucket], engines: Sequence[Any], update_ids: Sequence[int]) -> dict[str, Any]:
        """This sender's part of one update (between the pool's begin and finish on every engine; update_ids as in
        `WeightOwners.send`): every non-empty bucket to every engine; an engine that fails one gets no more. Returns
        {"failed": {engine index: (LOST | RAISED, message)}, "buckets", "tensors", "bytes"} (this sender's counts)."""
        import ray

        self._pending = []
        failed: dict[int, tuple[str, str]] = {}
        loads: dict[int, list[Any]] = {i: [] for i in range(len(engines))}
        counts = {"buckets": 0, "tensors": 0, "bytes": 0}
        for bucket in buckets:
            if not bucket:  # owners and export_hf_weights(dst=0) yield empty buckets on the other ranks
                continue
            bucket = _checked_bucket(bucket, self.device)
            item = self._prepare(bucket)
            counts["buckets"] += 1
            counts["tensors"] += len(bucket)
            counts["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
            live = {i: engine for i, engine in enumerate(engines) if i not in failed}
            for i, outcome in self._start_all(live, item, update_ids).items():
                if isinstance(outcome, BaseException):
                    failed[i] = self._failure(engines[i], i, outcome)
                else:
                    loads[i].append(outcome)
            self._pending.append(self._kept(item))  # at once: one bucket in the sending form at a time
        deadline = time.monotonic() + self.timeout_s
        for i, refs in loads.items():  # every engine's loads, bounded by one timeout in all
            if i in failed or not refs:
                continue
            try:
                ray.get(refs, timeout=max(0.0, deadline - time.monotonic()))
            except Exception as error:  # noqa: BLE001 - sorted by _failure
                failed[i] = self._failure(engines[i], i, error)
        return {"failed": failed, **counts}

    def _failure(self, engine: Any, index: int, error: BaseException) -> tuple[str, str]:
        """(LOST | RAISED, message) for an engine that failed a transfer, whose connection is then dropped."""
        from ray.exceptions import RayTaskError

        kind = RAISED if isinstance(error, RayTaskError) and not is_engine_failure(error) else LOST
        logger.warning("%s: weight transfer to engine %d failed (%s): %s", self.sender_id, index, kind, error)
        self.forget(engine)
        return kind, f"{type(error).__name__}: {error}"

    def conclude(self, committed: bool) -> None:
        """The open update was committed (its buckets are what `replay` sends from now on) or abandoned."""
        if committed:
            self._current = self._pending
        self._pending = []

    def replay(self, engine: Any, update_id: int) -> int:
        """The last committed update's buckets to one restarted engine, whose update (`update_id`) the pool opened.
        Raises on failure; returns the number of buckets."""
        import ray

        ray.get([self._start(engine, item, update_id) for item in self._current], timeout=self.timeout_s)
        return len(self._current)

    def forget(self, engine: Any) -> None:
        """An engine is gone or replaced: release what this sender holds for it (nothing by default)."""

    def close(self) -> None:
        self._pending, self._current = [], []


def _outcome(call: Callable[..., Any], *args: Any) -> Any:
    """call(*args), or the exception it raised (reported per engine by BucketSender.send)."""
    try:
        return call(*args)
    except Exception as error:  # noqa: BLE001 - returned to the caller
        return error


class ObjectStoreSender(BucketSender):
    """Buckets as numpy arrays through Ray's object store: one `ray.put` per bucket, read zero-copy by every engine
    of the node. The last committed update stays in the object store (one host-memory copy of the model)."""

    name = "object_store"

    def _prepare(self, bucket: Bucket) -> Any:
        import ray

        return ray.put(pack_bucket(bucket))


class GlooSender(BucketSender):
    """The "megatron_rl_gloo" backend's sender: one `GlooTrainerWeightTransferEngine` per engine (its own group, so
    an engine that dies breaks only its own), connected on first use, engines sent to in parallel threads; each
    bucket packed once into one buffer for all engines. A failed broadcast drops that engine's group (a later
    connection builds a new one)."""

    name = "gloo"
    backend = "megatron_rl_gloo"  # weight_transfer_engines.GLOO_BACKEND (not imported here: vLLM's import is slow)

    def __init__(self, sender_id: str = "driver", timeout_s: float = 600.0):
        super().__init__(sender_id, timeout_s)
        self._senders: dict[Any, Any] = {}  # engine actor id -> GlooTrainerWeightTransferEngine
        self._lock = threading.Lock()  # an actor rank's send (main thread) and replay (weights thread) share them
        self._threads = ThreadPoolExecutor(max_workers=32, thread_name_prefix=f"{sender_id}-gloo")  # per engine

    def _prepare(self, bucket: Bucket) -> Any:
        from megatron_rl.rollout.packed_buckets import pack_into_buffer
        from megatron_rl.rollout.weight_transfer_engines import update_info

        return update_info(bucket, self.sender_id), pack_into_buffer([t for _, t in bucket], self.device)

    def _connected(self, engine: Any):
        """This engine's trainer engine, connected on first use (the group's TCP store on this node's Ray address:
        loopback on a local cluster)."""
        key = engine._actor_id
        with self._lock:
            sender = self._senders.get(key)
        if sender is None:
            import ray

            factory = self.load_backend()
            workers = ray.get(engine.num_workers.remote(), timeout=self.timeout_s)
            sender = factory.trainer_init(
                self._init_info_cls()(master_address=ray.util.get_node_ip_address(), num_workers=workers,
                                      timeout_s=self.timeout_s, sender=self.sender_id, rank=0),
                client=_EngineClient(engine, self.timeout_s, transport=self.name))
            with self._lock:
                self._senders[key] = sender
        return sender

    def load_backend(self):
        """vLLM's trainer-side factory with our backend registered (importing vLLM's weight-transfer API takes ~2.5
        CPU-seconds on CPU: `ActorGroup.weight_owners` has the ranks do it while the engines still start)."""
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

        from megatron_rl.rollout.weight_transfer_engines import register_backends

        register_backends()
        return WeightTransferTrainerFactory

    def _init_info_cls(self):
        """The trainer init info of this sender's backend (its `backend` is the factory's key)."""
        from megatron_rl.rollout.weight_transfer_engines import GlooTrainerInitInfo

        return GlooTrainerInitInfo

    def _on_device(self):
        """The context the per-engine threads send in (none needed for gloo)."""
        return contextlib.nullcontext()

    def _start(self, engine: Any, item: Any, update_id: int) -> Any:
        """The engine's `load_bucket(info)` while we broadcast the buffer (it receives inside that call)."""
        with self._on_device():
            return self._start_on_device(engine, item, update_id)

    def _start_on_device(self, engine: Any, item: Any, update_id: int) -> Any:
        import ray

        info, buffer = item
        try:
            sender = self._connected(engine)
            ref = engine.load_bucket.remote(self.name, info, update_id)
            try:
                sender.send_packed(buffer, partial(_finished, ref))
            except BaseException:
                if _finished(ref):
                    ray.get(ref, timeout=0)  # the engine's own error says why it did not receive
                raise
            return ref
        except BaseException:
            self.forget(engine)
            raise

    def _start_all(self, engines: dict[int, Any], item: Any, update_ids: Sequence[int]) -> dict[int, Any]:
        """In parallel: a slow or hung engine delays no other."""
        futures = {i: self._threads.submit(_outcome, self._start, engine, item, update_ids[i])
                   for i, engine in engines.items()}
        return {i: future.result() for i, future in futures.items()}

    def send(self, buckets: Iterable[Bucket], engines: Sequence[Any], update_ids: Sequence[int]) -> dict[str, Any]:
        report = super().send(buckets, engines, update_ids)
        keep = {engine._actor_id for engine in engines}
        with self._lock:  # forget the connections of engines that are no longer in the pool
            stale = [self._senders.pop(key) for key in list(self._senders) if key not in keep]
        for sender in stale:
            sender.shutdown()
        return report

    def forget(self, engine: Any) -> None:
        with self._lock:
            sender = self._senders.pop(engine._actor_id, None)
        if sender is not None:
            sender.shutdown()

    def close(self) -> None:
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            sender.shutdown()
        self._threads.shutdown(wait=False)
        super().close()


class NcclSender(GlooSender):
    """The "megatron_rl_nccl" backend's sender (GPU): `GlooSender` with NCCL groups, so each bucket is packed on this
    process's GPU and broadcast GPU to GPU. Each bucket, once broadcast to every engine, is kept for replays in host
    memory (a replay copies it back to the GPU): so the GPU holds one packed bucket at a time, never a second copy of
    the owner's share.
    Written against vLLM's `PyNcclCommunicator` and not yet run (no GPU here; the GPU tests are marked `gpu`)."""

    name = "nccl"
    backend = "megatron_rl_nccl"  # weight_transfer_engines.NCCL_BACKEND

    def __init__(self, sender_id: str = "driver", timeout_s: float = 600.0):
        if not torch.cuda.is_available():
            raise RuntimeError(f"rollout.transport 'nccl': the sender {sender_id!r} has no CUDA GPU (NCCL sends GPU "
                               "to GPU); use transport 'gloo' on CPU")
        super().__init__(sender_id, timeout_s)
        self.device = torch.device("cuda", torch.cuda.current_device())

    def _init_info_cls(self):
        from megatron_rl.rollout.weight_transfer_engines import NcclTrainerInitInfo

        return NcclTrainerInitInfo

    def _kept(self, item: Any) -> Any:
        info, buffer = item
        return info, buffer.to("cpu")

    def _on_device(self):
        """This sender's GPU as the current device of the per-engine threads (a new thread starts on device 0)."""
        return torch.cuda.device(self.device)


class IpcSender(BucketSender):
    """The "megatron_rl_ipc" backend's sender (colocated engines): one per actor rank, and every rank takes part.
    Per bucket (every rank gets every whole bucket: `whole_buckets_on_every_rank`):
    1. each rank that hosts an engine's worker (engine e's worker k runs in actor rank e*tp+k's bundle, on its GPU:
       `placement.engine_bundle_indices`) packs the bucket into a buffer shared with that worker: the next of its two
       reused buffers (`shared_buffers.SharedRing`; shared and opened once per update, as vLLM's
       `packed_ipc_producer` reuses one buffer, not once per bucket);
    2. the ranks gather the handles (`all_gather_object` over the actor's torch.distributed group);
    3. each engine's first host rank has its engine load the bucket from its workers' buffers;
    4. while the engines load it, the ranks export and pack the next bucket into the other buffer (steps 1-3), then
       wait for this bucket's loads (bounded by the timeout; a failed engine gets no more buckets, as in every
       transport) and pass a barrier: only then may the bucket after next overwrite this buffer. The buffers are
       freed at the end of the update.
    Nothing is kept for replays (that would hold a second copy of the model beside the actor's): `replay` sends
    buckets exported again, which the actor rank allows only while its weights are the committed ones
    (`_MegatronWorker.replay_weights`). The counts are reported by rank 0 (every rank sees every bucket)."""

    name = "ipc"
    backend = "megatron_rl_ipc"  # weight_transfer_engines.IPC_BACKEND
    whole_buckets_on_every_rank = True

    def __init__(self, sender_id: str = "driver", timeout_s: float = 600.0):
        import torch.distributed as dist

        from megatron_rl.rollout.shared_buffers import SharedRing

        if not dist.is_initialized():
            raise RuntimeError(f"rollout.transport 'ipc': the sender {sender_id!r} is not an actor rank; ipc hands "
                               "each bucket from the actor ranks to the engines colocated with them "
                               "(rollout.weight_sender 'owners', resources.colocate true)")
        super().__init__(sender_id, timeout_s)
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else \
            torch.device("cpu")
        self._hosts_of: dict[Any, list[int]] = {}  # engine actor id -> the actor ranks of its workers, in order
        self._ring = SharedRing(self.device)  # the two buffers this rank packs buckets into, in turn

    def _prepare(self, bucket: Bucket) -> Any:
        """The bucket packed into the next of this rank's shared buffers (on the ranks that host an engine's worker):
        (slot, handle)."""
        slot, shared = self._ring.pack([t for _, t in bucket])
        return slot, shared.handle

    def load_backend(self) -> None:
        """Import the worker-side module the send builds its update infos with (it imports vLLM's weight-transfer
        API: ~2.5 CPU-seconds on CPU), ahead of the first update."""
        import megatron_rl.rollout.weight_transfer_engines  # noqa: F401

    def _hosts(self, engines: Sequence[Any]) -> tuple[list[list[int] | None], dict[int, tuple[str, str]]]:
        """The actor ranks colocated with each engine's workers, in worker order, one view for every rank: rank 0
        asks each engine once (its engine id and number of workers) and broadcasts the answer (collective). An
        engine that does not answer is reported failed (by rank 0) and has no hosts (None)."""
        import ray
        import torch.distributed as dist

        from megatron_rl.cluster.placement import engine_bundle_indices

        failed: dict[int, tuple[str, str]] = {}
        plan: list[list[int] | None] | None = None
        if self.rank == 0:
            plan = []
            for i, engine in enumerate(engines):
                ranks = self._hosts_of.get(engine._actor_id)
                if ranks is None:
                    try:
                        info, workers = ray.get([engine.info.remote(), engine.num_workers.remote()],
                                                timeout=self.timeout_s)
                    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as error:
                        failed[i] = self._failure(engine, i, error)
                        plan.append(None)
                        continue
                    ranks = engine_bundle_indices(info["engine_id"], workers)
                    if ranks[-1] >= self.world_size:
                        raise RuntimeError(f"rollout.transport 'ipc': engine {info['engine_id']}'s workers would be "
                                           f"colocated with actor ranks {ranks}, but the actor has {self.world_size}")
                plan.append(ranks)
            # only the engines of this update: a restarted engine is a new actor
            self._hosts_of = {e._actor_id: r for e, r in zip(engines, plan) if r is not None}
        box = [plan]
        dist.broadcast_object_list(box, src=0)
        return box[0], failed

    def send(self, buckets: Iterable[Bucket], engines: Sequence[Any], update_ids: Sequence[int]) -> dict[str, Any]:
        """This rank's part of one update (collective over the actor's ranks; see the class docstring). Returns
        {"failed": {engine index: (LOST | RAISED, message)} of the engines this rank leads (rank 0: also those that
        did not say where they run), "buckets", "tensors", "bytes"} (counted on rank 0 only)."""
        import torch.distributed as dist

        from megatron_rl.rollout.shared_buffers import device_key
        from megatron_rl.rollout.packed_buckets import bucket_metadata
        from megatron_rl.rollout.weight_transfer_engines import ipc_update_info

        hosts, failed = self._hosts(engines)
        led = [i for i, ranks in enumerate(hosts) if ranks is not None and ranks[0] == self.rank]
        hosting = any(ranks is not None and self.rank in ranks for ranks in hosts)
        key = device_key(self.device)
        counts = {"buckets": 0, "tensors": 0, "bytes": 0}
        in_flight: dict[int, Any] | None = None  # the previous bucket's loads (by engine index), not yet settled
        try:
            for bucket in buckets:
                bucket = _checked_bucket(bucket, None)  # every rank: the same whole bucket, where the export put it
                if not bucket:
                    continue
                packed = self._prepare(bucket) if hosting else None  # while the engines load the previous one
                handles: list[Any] = [None] * self.world_size
                dist.all_gather_object(handles, None if packed is None else (packed[0], key, packed[1]))
                metadata = bucket_metadata(bucket)
                loads = {}
                for i in (i for i in led if i not in failed):
                    slot = handles[hosts[i][0]][0]  # the same on every host rank: they take their buffers in turn
                    info = ipc_update_info(metadata, {handles[r][1]: handles[r][2] for r in hosts[i]}, slot)
                    outcome = _outcome(self._start, engines[i], info, update_ids[i])
                    if isinstance(outcome, BaseException):
                        failed[i] = self._failure(engines[i], i, outcome)
                    else:
                        loads[i] = outcome
                previous, in_flight = in_flight, loads
                if previous is not None:
                    self._settle(previous, engines, failed)
                if self.rank == 0:
                    counts["buckets"] += 1
                    counts["tensors"] += len(bucket)
                    counts["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
            if in_flight is not None:
                last, in_flight = in_flight, None
                self._settle(last, engines, failed)
        finally:
            self._ring.release()  # the engines let go of them at the update's end (on an error: the update fails)
        return {"failed": failed, **counts}

    def _settle(self, loads: dict[int, Any], engines: Sequence[Any], failed: dict[int, tuple[str, str]]) -> None:
        """One bucket's end: wait for the loads this rank started (one timeout for all; a failed engine is recorded
        in `failed`), then a barrier: every engine has loaded the bucket, or failed, so its buffers may take the
        bucket after next. Collective."""
        import ray
        import torch.distributed as dist

        deadline = time.monotonic() + self.timeout_s
        for i, ref in loads.items():
            if i in failed:  # it failed on a later bucket's start: its loads no longer matter
                continue
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except Exception as error:  # noqa: BLE001 - sorted by _failure
                failed[i] = self._failure(engines[i], i, error)
        dist.barrier()

    def conclude(self, committed: bool) -> None:
        """As for every sender; on GPU also return the buffers' memory. Each rank freed its buffers at the end of its
        send, but CUDA IPC keeps a freed buffer until its receiver has let go of it, and an engine worker holds them
        until `finish_weight_update`, which the pool calls before this: collecting now gives the actor that memory
        back before it trains, instead of at the next update."""
        super().conclude(committed)
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()

    def replay(self, engine: Any, update_id: int, buckets: Iterable[Bucket] | None = None) -> int:
        """`buckets` (the committed weights, exported again on every rank) to one restarted engine; collective over
        the actor's ranks. Raises on failure; returns the number of buckets (rank 0's count)."""
        if buckets is None:
            raise ValueError("the ipc sender keeps no buckets: replay needs the committed weights exported again")
        report = self.send(buckets, [engine], [update_id])
        if report["failed"]:
            _, why = report["failed"][0]
            raise RuntimeError(f"{self.sender_id}: replay to a restarted engine failed: {why}")
        return report["buckets"]


class BucketStream(WeightOwners):
    """One update as a stream of buckets from this process, sent by `sender` (the pool's own, the driver)."""

    def __init__(self, buckets: Iterable[Bucket], sender: BucketSender):
        self.buckets, self.sender = buckets, sender
        self.transport = sender.name

    def send(self, engines: Sequence[Any], update_ids: Sequence[int]) -> dict[str, Any]:
        buckets, self.buckets = self.buckets, ()  # sent once; the sender keeps what a replay needs
        return self.sender.send(buckets, engines, update_ids)

    def conclude(self, committed: bool) -> None:
        self.sender.conclude(committed)

    def replay(self, engine: Any, update_id: int) -> None:
        self.sender.replay(engine, update_id)


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
    the timeout). `version` is the weights version a whole `send_weights` update installs; `transport` the sender's
    (`GlooSender.name` or `NcclSender.name`)."""

    def __init__(self, engine: Any, timeout_s: float, version: int = 0, transport: str = "gloo"):
        self.engine, self.timeout_s, self.version, self.transport = engine, timeout_s, version, transport
        self.update_id: int | None = None  # the open update's id (what start_weight_update's begin returned)

    def _get(self, ref):
        import ray

        return ray.get(ref, timeout=self.timeout_s)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        self._get(self.engine.init_weight_transfer.remote(init_info))

    def start_weight_update(self) -> None:
        self.update_id = self._get(self.engine.begin_weight_update.remote(self.version))

    def update_weights(self, update_info: dict) -> None:
        self._get(self.engine.load_bucket.remote(self.transport, update_info, self.update_id))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._get(self.engine.finish_weight_update.remote())


# name -> the sender class of a transport; the worker halves are in weight_transfer_engines.py.
TRANSPORTS: dict[str, Callable[..., BucketSender]] = {
    GlooSender.name: GlooSender,
    NcclSender.name: NcclSender,
    IpcSender.name: IpcSender,
    ObjectStoreSender.name: ObjectStoreSender,
}

# transport -> the vLLM weight-transfer backend its engines run
BACKENDS = {GlooSender.name: GlooSender.backend, NcclSender.name: NcclSender.backend,
            IpcSender.name: IpcSender.backend, ObjectStoreSender.name: "megatron_rl_object_store"}


def make_sender(name: str, *, sender_id: str = "driver", timeout_s: float = 600.0) -> BucketSender:
    """A sender of transport `name` (raises before any engine starts for an unknown one, or one this process
    cannot send with: nccl without a GPU, ipc outside the actor's ranks)."""
    if name not in TRANSPORTS:
        raise ValueError(f"rollout.transport: unknown transport {name!r}; use one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](sender_id=sender_id, timeout_s=timeout_s)
