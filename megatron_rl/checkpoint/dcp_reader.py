"""Read tensors out of a PyTorch Distributed Checkpoint (DCP) folder in one process, one box at a time.

Megatron's `torch_dist` backend (megatron/core/dist_checkpointing/strategies/torch.py) writes a DCP folder:
`.metadata` (pickled `torch.distributed.checkpoint.metadata.Metadata`: every key's global shape, dtype and the
chunks each rank saved), `__<rank>_<n>.distcp` data files (each chunk a `torch.save`d tensor at a byte offset),
`common.pt` (non-sharded state) and `metadata.json` (`{"sharded_backend": "torch_dist", ...}`).

`DistCheckpointReader` reads any sub-box of a global tensor (e.g. one layer of a layer-stacked tensor, or one
expert of an expert-stacked tensor) without a process group and without loading anything else: it plans the
reads with DCP's own resharding helper (`create_read_items_for_chunk_list`, the code DCP uses when a checkpoint is
loaded into a different sharding) and lets the stock `FileSystemReader` read only the overlapping chunks. Chunk
payloads are read with `torch.load(weights_only=True)` by DCP; the `.metadata` file itself is a pickle (that is
the DCP format), so only open checkpoints you trust.

`check_files()` verifies, before any conversion work, that every data file the metadata refers to exists and is
long enough for every chunk stored in it: a truncated or missing shard fails in milliseconds with the file named.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

MEGATRON_METADATA_FILE = "metadata.json"
DCP_METADATA_FILE = ".metadata"


class DistCheckpointError(ValueError):
    """A distributed checkpoint folder that is missing, truncated, of an unsupported backend, or lacks a key."""


@dataclass(frozen=True)
class TensorInfo:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class _BoxLoadPlanner:
    """The part of DCP's LoadPlanner protocol that `FileSystemReader.read_data` calls, for caller-provided
    target tensors that each cover a box [offsets, offsets + target.shape) of one checkpoint key."""

    def __init__(self, metadata, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        self.metadata = metadata
        self.requests = requests

    def create_local_plan(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        items = []
        for key, (offsets, target) in self.requests.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=target.shape)
            items += create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [chunk])
        return LoadPlan(items)

    def resolve_tensor(self, read_item) -> torch.Tensor:
        """The view of the target that a read item fills (its dest_offsets are relative to the requested box)."""
        out = self.requests[read_item.dest_index.fqn][1]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            out = out.narrow(dim, start, length)
        return out

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor returned a view of the target: the data is already in place

    def load_bytes(self, read_item, value) -> None:
        raise DistCheckpointError(f"unexpected byte-object read for '{read_item.dest_index.fqn}'")


class DistCheckpointReader:
    """Random access to the tensors of a Megatron `torch_dist` (DCP) checkpoint folder, in one process."""

    def __init__(self, path: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise DistCheckpointError(f"{self.path} is not a directory: expected a Megatron distributed checkpoint")
        backend_file = os.path.join(self.path, MEGATRON_METADATA_FILE)
        if os.path.isfile(backend_file):
            with open(backend_file, encoding="utf-8") as f:
                backend = json.load(f).get("sharded_backend")
            if backend != "torch_dist":
                raise DistCheckpointError(
                    f"{backend_file}: sharded_backend is {backend!r}; only 'torch_dist' checkpoints can be read "
                    "(re-save with Megatron's default torch_dist format)"
                )
        else:
            raise DistCheckpointError(
                f"{self.path} has no {MEGATRON_METADATA_FILE}: the save did not finish (Megatron writes it last) "
                "or this is not a Megatron distributed checkpoint"
            )
        if not os.path.isfile(os.path.join(self.path, DCP_METADATA_FILE)):
            raise DistCheckpointError(f"{self.path} has no {DCP_METADATA_FILE} (PyTorch DCP metadata): incomplete checkpoint")
        self._storage = FileSystemReader(self.path)
        try:
            self.metadata = self._storage.read_metadata()
        except Exception as e:  # noqa: BLE001 - pickle/EOF errors of a damaged file
            raise DistCheckpointError(f"cannot read {os.path.join(self.path, DCP_METADATA_FILE)}: {e}") from e
        self._storage.set_up_storage_reader(self.metadata, True)
        self._tensors = {
            key: TensorInfo(key, tuple(md.size), md.properties.dtype)
            for key, md in self.metadata.state_dict_metadata.items()
            if isinstance(md, TensorStorageMetadata)
        }
        self.object_keys = sorted(set(self.metadata.state_dict_metadata) - set(self._tensors))

    # -------------------------------------------------------------------------------------------------------
    def tensors(self) -> dict[str, TensorInfo]:
        """Every tensor key with its global shape and dtype (byte objects such as `_extra_state` excluded)."""
        return dict(self._tensors)

    def info(self, key: str) -> TensorInfo:
        if key not in self._tensors:
            raise DistCheckpointError(f"tensor '{key}' is not in the checkpoint {self.path}")
        return self._tensors[key]

    def check_files(self) -> None:
        """Every data file named in the metadata exists and holds every byte range the metadata points to."""
        needed: dict[str, int] = {}
        for info in self.metadata.storage_data.values():
            end = int(info.offset) + int(info.length)
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
        missing = sorted(p for p in needed if not os.path.isfile(os.path.join(self.path, p)))
        if missing:
            raise DistCheckpointError(
                f"{self.path}: {len(missing)} shard file(s) named in the checkpoint metadata are missing: "
                f"{missing[:5]} (an incomplete copy of the checkpoint?)"
            )
        for name, end in sorted(needed.items()):
            size = os.path.getsize(os.path.join(self.path, name))
            if size < end:
                raise DistCheckpointError(
                    f"{os.path.join(self.path, name)} is truncated: {size} bytes, the checkpoint metadata needs at "
                    f"least {end} (interrupted save or incomplete copy)"
                )

    def read(self, key: str, index: Sequence[int] = (), *, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The global tensor `key`, or its sub-tensor `tensor[index]` for a tuple of leading indices.

        Only the chunks overlapping the requested box are read from disk.
        """
        info = self.info(key)
        index = tuple(int(i) for i in index)
        if len(index) > len(info.shape):
            raise DistCheckpointError(f"index {index} has more dims than '{key}' {info.shape}")
        for dim, (i, n) in enumerate(zip(index, info.shape)):
            if not 0 <= i < n:
                raise DistCheckpointError(f"index {i} out of range for dim {dim} of '{key}' {info.shape}")
        box_shape = (1,) * len(index) + info.shape[len(index):]
        offsets = index + (0,) * (len(info.shape) - len(index))
        target = torch.empty(box_shape, dtype=info.dtype)
        self._read_boxes({key: (offsets, target)})
        out = target.reshape(info.shape[len(index):])
        return out if dtype is None else out.to(dtype)

    def _read_boxes(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]) -> None:
        planner = _BoxLoadPlanner(self.metadata, requests)
        plan = self._storage.prepare_local_plan(planner.create_local_plan())
        covered = {key: 0 for key in requests}
        for item in plan.items:
            covered[item.dest_index.fqn] += int(torch.Size(item.lengths).numel())
        for key, (_, target) in requests.items():
            if covered[key] != target.numel():
                raise DistCheckpointError(
                    f"the checkpoint {self.path} does not cover all of '{key}' (chunks for {covered[key]} of "
                    f"{target.numel()} elements): a rank's shard is missing from the metadata"
                )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                self._storage.read_data(plan, planner).wait()
            except DistCheckpointError:
                raise
            except Exception as e:  # noqa: BLE001 - torch.load / IO errors of damaged files
                raise DistCheckpointError(f"cannot read {sorted(requests)} from {self.path}: {e}") from e
