"""shared_buffers (the ipc transport's data plane) on CPU: a /dev/shm buffer written by one process is read in place by
another, outlives the sender's release for a receiver that mapped it, and nothing is left in /dev/shm; a handle
outside our files is refused; too little shared memory is refused before anything is written. Two buckets through the
whole data plane and one reused buffer (packed as the ipc sender packs them, taken as its worker takes them) on CPU,
and on a CUDA GPU (marked `gpu`; the GPU check's `cuda_ipc` runs the same function with 256 MiB)."""
import multiprocessing as mp
import time
import os
from collections import namedtuple

import pytest
import torch

from megatron_rl.rollout.shared_buffers import (
    SHM_DIR,
    SHM_PREFIX,
    SharedRing,
    device_key,
    importer_for,
    open_shared,
    share,
)


def _ours() -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(f"{SHM_PREFIX}{os.getpid()}_")}


def _read_in_child(handle, queue, release_first) -> None:
    """In another process: map the buffer, wait until the parent released it (when asked), report its sum."""
    buffer = open_shared(handle, "cpu")
    release_first.wait(timeout=60)
    queue.put(int(buffer.to(torch.int64).sum()))


def test_a_buffer_is_read_in_place_by_another_process_and_released():
    before = _ours()
    shared = share(1 << 20, "cpu")
    shared.tensor.copy_(torch.arange(1 << 20, dtype=torch.int64).remainder(251).to(torch.uint8))
    expected = int(shared.tensor.to(torch.int64).sum())
    assert shared.handle[0] == "shm" and _ours() - before

    ctx = mp.get_context("spawn")
    queue, released = ctx.Queue(), ctx.Event()
    child = ctx.Process(target=_read_in_child, args=(shared.handle, queue, released))
    child.start()
    try:
        # the child maps it first; the sender then releases (unlinks): the child's mapping still holds the pages
        deadline = time.monotonic() + 60
        while child.is_alive() and time.monotonic() < deadline and not _mapped_by(child.pid, shared.handle[1]):
            time.sleep(0.05)
        shared.release()
        released.set()
        assert queue.get(timeout=60) == expected
    finally:
        child.join(timeout=60)
    assert child.exitcode == 0
    assert _ours() == before  # nothing left in /dev/shm
    shared.release()  # idempotent


def _mapped_by(pid: int, path: str) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return path in f.read()
    except OSError:
        return False


def test_the_receiver_refuses_a_handle_that_is_not_one_of_our_buffers():
    with pytest.raises(ValueError, match="refusing to map '/etc/passwd'"):
        open_shared(("shm", "/etc/passwd", 10), "cpu")
    with pytest.raises(ValueError, match="cannot be opened on cpu"):
        open_shared(("cuda", *range(15)), "cpu")


def test_too_little_shared_memory_is_refused_naming_the_fix(monkeypatch):
    stats = namedtuple("statvfs", "f_bavail f_frsize")(16, 4096)  # 64 KiB free
    monkeypatch.setattr(os, "statvfs", lambda path: stats)
    before = _ours()
    with pytest.raises(RuntimeError, match=r"/dev/shm, which has 0 MiB free.*rollout.weight_bucket_mb.*shm-size"):
        share(1 << 20, "cpu")
    assert _ours() == before


def _share_and_die(connection) -> None:
    """In another process: share a buffer, report its file, exit without releasing it (as a killed rank would)."""
    connection.send(os.path.basename(share(4096, "cpu").handle[1]))
    os._exit(0)


def test_files_left_by_a_dead_sender_are_deleted_by_the_next_process_that_shares(monkeypatch):
    """A sender that dies while sharing leaves its file; the next process's first buffer deletes it (sweep_stale).
    A live process's file, another PID namespace's and a file not named like ours stay."""
    from megatron_rl.rollout import shared_buffers

    ctx = mp.get_context("spawn")
    receiver, sender = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_share_and_die, args=(sender,))
    child.start()
    assert receiver.poll(120), "the child shared nothing within 120 s"
    dead = receiver.recv()
    child.join(timeout=60)
    assert child.exitcode == 0 and os.path.exists(os.path.join(SHM_DIR, dead))
    namespace = shared_buffers._pid_namespace()
    other_namespace = f"{SHM_PREFIX}{child.pid}_{namespace + 1}_0"
    not_ours = f"{SHM_PREFIX}{child.pid}_x"
    for name in (other_namespace, not_ours):
        open(os.path.join(SHM_DIR, name), "wb").close()
    try:
        monkeypatch.setattr(shared_buffers, "_swept", False)  # this process's first buffer again
        live = share(4096, "cpu")
        try:
            left = set(os.listdir(SHM_DIR))
            assert dead not in left  # its owner is gone
            assert {os.path.basename(live.handle[1]), other_namespace, not_ours} <= left
            assert shared_buffers.sweep_stale() == []  # nothing else of a gone owner
        finally:
            live.release()
    finally:
        for name in (dead, other_namespace, not_ours):
            if os.path.exists(os.path.join(SHM_DIR, name)):
                os.unlink(os.path.join(SHM_DIR, name))


def test_handles_are_filed_under_the_device():
    assert device_key("cpu") == device_key(torch.device("cpu")) == "cpu"
    with pytest.raises(ValueError, match="no shared buffers on device meta"):
        device_key("meta")


@pytest.mark.parametrize("device", [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                 reason="needs a CUDA GPU")]),
])
def test_buckets_go_through_the_ipc_data_plane_bit_exact_and_the_buffer_is_freed(device):
    """The GPU check's `ipc_roundtrip`: two mixed-dtype buckets packed here in turn into one reused shared buffer,
    taken by a spawned process that opens it once (view, clone), bit-exact per tensor, the same device key on both
    sides, and the buffer freed once the receiver let go (CUDA: allocated memory back where it was; CPU: the /dev/shm
    file gone)."""
    from megatron_rl.benchmarks.gpu_check import ipc_roundtrip

    before = _ours()
    numbers = ipc_roundtrip(device, 4 << 20)
    assert numbers["tensors"] == 5 and numbers["buckets"] == 2 and 4 <= numbers["MiB"] < 5
    assert numbers["open_handle_s"] >= 0 and numbers["view_and_clone_s"] > 0
    assert _ours() == before


def test_a_ring_reuses_its_two_buffers_and_replaces_one_only_by_a_larger_one():
    """What the ipc sender packs buckets into: two buffers taken in turn, each shared once while the buckets fit; a
    bucket that does not fit replaces that slot's buffer; release frees them all and starts again at slot 0."""
    before = _ours()
    ring = SharedRing("cpu")
    try:
        (s0, a), (s1, b), (s2, c) = ring.take(1000), ring.take(800), ring.take(900)
        assert (s0, s1, s2) == (0, 1, 0) and c is a and b is not a  # 900 fits the first buffer: the same file
        assert len(_ours() - before) == 2
        s3, d = ring.take(5000)  # slot 1 is too small: replaced, its file unlinked
        assert s3 == 1 and d is not b and d.nbytes == 5000 and b.tensor is None and len(_ours() - before) == 2
    finally:
        ring.release()
    assert _ours() == before and ring.take(10)[0] == 0
    slot, packed = ring.pack([torch.arange(5, dtype=torch.int64), torch.ones(3)])  # what the ipc sender writes
    assert slot == 1 and torch.equal(packed.tensor[:40].view(torch.int64), torch.arange(5))
    ring.release()


def test_an_importer_keeps_a_reused_buffer_open_and_sees_what_is_written_into_it_later():
    """The receiving side of a reused buffer (CPU twin of vLLM's PackedBufferImporter): the same handle gives the
    same mapping, which shows the sender's later writes; another handle replaces it; the mapping outlives the
    sender's unlink."""
    first, second = share(4096, "cpu"), share(4096, "cpu")
    importer = importer_for("cpu")
    try:
        first.tensor.fill_(1)
        mapped = open_shared(first.handle, "cpu", importer)
        assert int(mapped.sum()) == 4096
        first.tensor.fill_(2)  # the next bucket, packed into the same buffer
        assert open_shared(first.handle, "cpu", importer) is mapped and int(mapped.sum()) == 2 * 4096
        second.tensor.fill_(3)
        assert int(open_shared(second.handle, "cpu", importer).sum()) == 3 * 4096
        second.release()  # unlinked: the receiver's mapping still reads it
        assert int(open_shared(second.handle, "cpu", importer).sum()) == 3 * 4096
    finally:
        importer.close()
        first.release()
        second.release()
