"""DistCheckpointReader: box reads from PyTorch-DCP folders, and up-front detection of incomplete folders."""
import os

import pytest
import torch

from megatron_rl.checkpoint.dcp_reader import DistCheckpointError, DistCheckpointReader
from tests.unit.checkpoint.helpers import write_dcp


@pytest.fixture()
def ckpt(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "stacked": torch.randn(3, 4, 5),
        "plain": torch.randn(6, 2),
        "half": torch.randn(4, 4).to(torch.bfloat16),
    }
    write_dcp(str(tmp_path / "ck"), tensors)
    return str(tmp_path / "ck"), tensors


def test_lists_keys_with_global_shapes_and_dtypes(ckpt):
    path, tensors = ckpt
    infos = DistCheckpointReader(path).tensors()
    assert {k: (i.shape, i.dtype) for k, i in infos.items()} == {
        k: (tuple(t.shape), t.dtype) for k, t in tensors.items()
    }


def test_reads_whole_tensors_and_leading_index_boxes_exactly(ckpt):
    path, tensors = ckpt
    reader = DistCheckpointReader(path)
    assert torch.equal(reader.read("plain"), tensors["plain"])
    assert torch.equal(reader.read("half"), tensors["half"]) and reader.read("half").dtype == torch.bfloat16
    for i in range(3):
        assert torch.equal(reader.read("stacked", (i,)), tensors["stacked"][i])
    assert torch.equal(reader.read("stacked", (2, 1)), tensors["stacked"][2, 1])
    assert reader.read("half", dtype=torch.float32).dtype == torch.float32


def test_bad_key_or_index_is_refused_with_the_name(ckpt):
    reader = DistCheckpointReader(ckpt[0])
    with pytest.raises(DistCheckpointError, match="'nope' is not in the checkpoint"):
        reader.read("nope")
    with pytest.raises(DistCheckpointError, match="index 3 out of range for dim 0 of 'stacked'"):
        reader.read("stacked", (3,))


def _data_files(path):
    return sorted(f for f in os.listdir(path) if f.endswith(".distcp"))


def test_truncated_data_file_is_detected_before_reading(ckpt):
    path, _ = ckpt
    victim = os.path.join(path, _data_files(path)[0])
    size = os.path.getsize(victim)
    with open(victim, "r+b") as f:
        f.truncate(size - 10)
    with pytest.raises(DistCheckpointError, match=rf"{_data_files(path)[0]} is truncated: {size - 10} bytes"):
        DistCheckpointReader(path).check_files()


def test_missing_data_file_is_named(ckpt):
    path, _ = ckpt
    name = _data_files(path)[0]
    os.remove(os.path.join(path, name))
    with pytest.raises(DistCheckpointError, match=rf"shard file\(s\) named in the checkpoint metadata are missing: \['{name}'\]"):
        DistCheckpointReader(path).check_files()


def test_intact_folder_passes_the_file_check(ckpt):
    DistCheckpointReader(ckpt[0]).check_files()  # must not raise
    assert DistCheckpointReader(ckpt[0]).read("plain").shape == (6, 2)


def test_unfinished_or_foreign_folders_are_refused(tmp_path, ckpt):
    path, tensors = ckpt
    os.remove(os.path.join(path, "metadata.json"))
    with pytest.raises(DistCheckpointError, match="has no metadata.json: the save did not finish"):
        DistCheckpointReader(path)
    write_dcp(str(tmp_path / "zarr"), tensors, backend="zarr")
    with pytest.raises(DistCheckpointError, match="sharded_backend is 'zarr'"):
        DistCheckpointReader(str(tmp_path / "zarr"))
    with pytest.raises(DistCheckpointError, match="is not a directory"):
        DistCheckpointReader(str(tmp_path / "absent"))
