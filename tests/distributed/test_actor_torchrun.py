"""The actor runs as a plain torchrun job (no Ray, no spawn_ranks): each rank initialises torch.distributed from
torchrun's environment, builds its TP shard, computes log-probs and takes a train step."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.distributed.test_actor_invariance import hf_log_probs_and_entropies, make_batch

pytestmark = pytest.mark.distributed
REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

SCRIPT = """
import sys

import torch

from megatron_rl.actor.config import ActorConfig
from megatron_rl.actor.megatron_actor import MegatronActor
from megatron_rl.parallel.layout import ParallelLayout
from megatron_rl.parallel.state import init_distributed_from_env
from tests.distributed.test_actor_invariance import make_batch, perturbed


def main(model_path, out_path):
    rank, world = init_distributed_from_env()  # RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT from torchrun
    actor = MegatronActor(ActorConfig(model_path=model_path, layout=ParallelLayout(tp=world))).setup()
    batch = make_batch()
    holder = [actor.compute_log_probs(batch)]
    torch.distributed.broadcast_object_list(holder, src=0)
    batch.old_log_probs = perturbed(holder[0])
    metrics = actor.train_step(batch)
    actor.shutdown()
    if rank == 0:
        torch.save({"log_probs": holder[0], "metrics": metrics}, out_path)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
"""


def test_actor_under_torchrun_tp2(tiny_model, tmp_path):
    path = tiny_model("qwen3")
    script, out = tmp_path / "actor_job.py", tmp_path / "result.pt"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script), path,
           str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = torch.load(out, weights_only=True)
    expected, _ = hf_log_probs_and_entropies(path, make_batch())
    for got, want in zip(result["log_probs"], expected):  # fp32, float-sum-order noise only (see the invariance tests)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    metrics = result["metrics"]
    assert metrics["grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["num_sequences"] == len(make_batch())
