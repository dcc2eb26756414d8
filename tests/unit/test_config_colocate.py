"""Config of colocated mode: resources.colocate drives rollout.colocate, the CPU/GPU accounting counts no engine
resources, engine ranks must fit on the actor ranks, and colocated GPU engines get sleep mode and their own memory
fraction (validated). No Ray, no engine."""
import pytest

from megatron_rl.config import ConfigError, load_config, required_cpus
from megatron_rl.rollout import EngineConfig, RolloutPoolConfig
from megatron_rl.cluster.placement import colocated_engine_bundles

BASE = ["data.synthetic.task=arithmetic", "run.output_dir=/tmp/taskH_unused", "resources.device=cpu"]


def test_rollout_colocate_follows_resources_colocate():
    assert load_config(None, BASE).rollout.colocate is False
    cfg = load_config(None, BASE + ["resources.colocate=true"])
    assert cfg.rollout.colocate is True and cfg.resources.colocate is True
    with pytest.raises(ConfigError, match="rollout.colocate=True but resources.colocate=False"):
        load_config(None, BASE + ["rollout.colocate=true"])


def test_cpu_accounting_counts_no_engine_cpus_when_colocated():
    split = load_config(None, BASE + ["resources.actor_ranks=2", "rollout.num_engines=2",
                                      "rollout.engine.cpus_per_engine=3"])
    assert required_cpus(split) == 2 + 2 * 3
    colocated = load_config(None, BASE + ["resources.actor_ranks=2", "rollout.num_engines=2",
                                          "rollout.engine.cpus_per_engine=3", "resources.colocate=true",
                                          "resources.num_cpus=2"])
    assert required_cpus(colocated) == 2
    with pytest.raises(ConfigError, match=r"resources.num_cpus=1 is less than .*\(2: .*0 for colocated engines"):
        load_config(None, BASE + ["resources.actor_ranks=2", "resources.colocate=true", "resources.num_cpus=1"])


def test_engine_ranks_must_fit_on_the_actor_ranks():
    with pytest.raises(ConfigError, match=r"resources.colocate=true: rollout.num_engines \(2\) x .* resources.actor_ranks=1"):
        load_config(None, BASE + ["resources.colocate=true", "rollout.num_engines=2"])
    assert colocated_engine_bundles(2, 2, 4) == [[0, 1], [2, 3]]
    assert colocated_engine_bundles(1, 1, 4) == [[0]]
    with pytest.raises(ValueError, match="6 engine ranks"):
        colocated_engine_bundles(3, 2, 4)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1])
def test_colocated_gpu_memory_utilization_is_validated(bad):
    with pytest.raises(ValueError, match=r"engine.colocated_gpu_memory_utilization: must be in \(0, 1\)"):
        EngineConfig(model="m", colocated_gpu_memory_utilization=bad)


def test_colocated_gpu_engines_sleep_and_use_their_memory_fraction():
    engine = EngineConfig(model="m", gpu_memory_utilization=0.9, colocated_gpu_memory_utilization=0.35)
    split = engine.llm_kwargs("gpu")
    assert split["gpu_memory_utilization"] == 0.9 and "enable_sleep_mode" not in split
    colocated = engine.llm_kwargs("gpu", colocated=True)
    assert colocated["gpu_memory_utilization"] == 0.35 and colocated["enable_sleep_mode"] is True
    # vLLM refuses enable_sleep_mode on CPU: a colocated CPU engine is a plain engine
    assert engine.llm_kwargs("cpu", colocated=True) == engine.llm_kwargs("cpu")
    assert RolloutPoolConfig(engine, colocate=True).colocate is True
