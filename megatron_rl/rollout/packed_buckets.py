"""The packed bucket: one weight bucket as one flat byte buffer, the wire format of the gloo, nccl and ipc weight
transports (docs/rollout.md, "Transports"). Both sides compute the same layout from the tensors' shapes and dtypes
(`bucket_metadata`, which travels in every bucket's update info), so only the buffer itself crosses: the sender
packs (`pack_into_buffer`), the worker views each tensor in place (`views_of_buffer`). Every tensor starts at a
multiple of ALIGN_BYTES, so a view of any dtype is aligned. Torch only (no vLLM): the GPU check packs and views
buckets on a machine without vLLM."""
from __future__ import annotations

import math
from typing import Iterable, Sequence

import torch

from megatron_rl.parallel.packing import round_up

ALIGN_BYTES = 64  # every tensor starts at a multiple of this in a packed bucket (any dtype can view it)


def bucket_layout(shapes: Sequence[Sequence[int]], dtypes: Sequence[torch.dtype]) -> tuple[list[int], int]:
    """Byte offset of every tensor in a packed bucket (each aligned to ALIGN_BYTES) and the buffer's size."""
    offsets, end = [], 0
    for shape, dtype in zip(shapes, dtypes):
        offsets.append(round_up(end, ALIGN_BYTES))
        end = offsets[-1] + math.prod(shape) * dtype.itemsize
    return offsets, end


def pack_into_buffer(tensors: Sequence[torch.Tensor], device: torch.device | str = "cpu",
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """One flat uint8 buffer on `device` holding `tensors` at `bucket_layout`'s offsets (written into `out` when
    given: a uint8 buffer of exactly the layout's size)."""
    offsets, size = bucket_layout([t.shape for t in tensors], [t.dtype for t in tensors])
    if out is not None and (out.dtype != torch.uint8 or out.numel() != size):
        raise ValueError(f"pack_into_buffer: out must be {size} uint8 bytes, got {out.numel()} {out.dtype}")
    buffer = torch.empty(size, dtype=torch.uint8, device=device) if out is None else out
    for tensor, offset in zip(tensors, offsets):
        flat = tensor.detach().reshape(-1)
        nbytes = flat.numel() * flat.element_size()
        buffer[offset:offset + nbytes].view(tensor.dtype).copy_(flat)
    return buffer


def views_of_buffer(buffer: torch.Tensor, shapes: Sequence[Sequence[int]],
                    dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """The tensors of a packed bucket, as views of `buffer` (no copy)."""
    offsets, size = bucket_layout(shapes, dtypes)
    if buffer.numel() != size:
        raise ValueError(f"packed bucket of {buffer.numel()} bytes, the layout needs {size}")
    return [buffer[offset:offset + math.prod(shape) * dtype.itemsize].view(dtype).view(tuple(shape))
            for shape, dtype, offset in zip(shapes, dtypes, offsets)]


def copies_from_buffer(buffer: torch.Tensor, shapes: Sequence[Sequence[int]],
                       dtypes: Sequence[torch.dtype]) -> list[torch.Tensor]:
    """The tensors of a packed bucket at the start of `buffer` (a reused buffer may be larger than the bucket),
    copied out of it: the receiver of a reused buffer must copy, since a later bucket is packed into it."""
    size = bucket_layout(shapes, dtypes)[1]
    return [view.clone() for view in views_of_buffer(buffer[:size], shapes, dtypes)]


def bucket_metadata(bucket: Iterable[tuple[str, torch.Tensor]]) -> dict[str, list]:
    """The names, torch dtype names and shapes of a bucket's tensors, in order: what a worker needs to view each tensor
    in the packed buffer (`views_of_buffer`, with `dtypes_of`)."""
    names, dtypes, shapes = [], [], []
    for name, tensor in bucket:
        names.append(name)
        dtypes.append(str(tensor.dtype).removeprefix("torch."))
        shapes.append(list(tensor.shape))
    return {"names": names, "dtype_names": dtypes, "shapes": shapes}


def dtypes_of(dtype_names: Iterable[str]) -> list[torch.dtype]:
    """`bucket_metadata`'s dtype names back to torch dtypes; a ValueError for a name that is not one."""
    dtypes = []
    for name in dtype_names:
        dtype = getattr(torch, name, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"{name!r} is not a torch dtype name")
        dtypes.append(dtype)
    return dtypes
