"""The object-store transport's packing (what crosses Ray) and the transport registry."""
import warnings

import numpy as np
import pytest
import torch

from megatron_rl.rollout.weight_transport import (
    PackedBucket,
    make_transport,
    pack_bucket,
    receive_bucket,
    unpack_bucket,
)

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
        ((_, t),) = receive_bucket("object_store", packed)
    assert t.tolist() == list(range(6))


def test_bad_buckets_and_payloads():
    with pytest.raises(TypeError, match=r"\(hf_name: str, tensor\) pairs"):
        pack_bucket([("w", [1.0, 2.0])])
    with pytest.raises(TypeError, match="PackedBucket"):
        receive_bucket("object_store", {"w": np.zeros(2)})
    with pytest.raises(NotImplementedError, match="no receiver"):
        receive_bucket("carrier_pigeon", PackedBucket([], [], []))


def test_transport_registry():
    transport = make_transport("object_store")
    assert transport.name == "object_store" and not transport.has_weights
    with pytest.raises(ValueError, match="rollout.transport: unknown transport 'tcp'"):
        make_transport("tcp")
    for name in ("nccl", "cuda_ipc"):
        with pytest.raises(NotImplementedError, match=f"'{name}' weight transport is not implemented"):
            make_transport(name)
