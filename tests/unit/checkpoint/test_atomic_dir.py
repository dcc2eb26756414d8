"""atomic_checkpoint_dir in one process: the final name appears only after the block succeeds."""
import os

import pytest

from megatron_rl.checkpoint.model_ckpt import atomic_checkpoint_dir


def test_success_renames_the_temporary_directory(tmp_path):
    out = tmp_path / "step_10"
    with atomic_checkpoint_dir(out, collective=False) as tmp:
        assert ".tmp-" in os.path.basename(tmp) and os.path.dirname(tmp) == str(tmp_path)
        assert not out.exists()
        (open(os.path.join(tmp, "x.txt"), "w")).write("done")
    assert (out / "x.txt").read_text() == "done"
    assert os.listdir(tmp_path) == ["step_10"]


def test_a_failure_inside_leaves_only_the_temporary_directory(tmp_path):
    out = tmp_path / "step_10"
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_checkpoint_dir(out, collective=False) as tmp:
            open(os.path.join(tmp, "half.bin"), "w").write("partial")
            raise RuntimeError("crash")
    assert not out.exists()
    (leftover,) = os.listdir(tmp_path)
    assert leftover.startswith("step_10.tmp-")


def test_existing_directory_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "step_10"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_checkpoint_dir(out, collective=False):
            pass
    with atomic_checkpoint_dir(out, overwrite=True, collective=False) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert sorted(os.listdir(out)) == ["new.txt"]
    assert os.listdir(tmp_path) == ["step_10"]
