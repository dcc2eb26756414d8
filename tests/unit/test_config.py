"""The config tree: typed loading, dotted overrides, derived defaults, cross-section checks, round trip."""
import dataclasses
from typing import Literal, Mapping

import pytest
import torch
import yaml

from megatron_rl.config import ConfigError, TrainConfig, config_yaml, load_config
from megatron_rl.config_loader import from_dict, parse_overrides

BASE = ["data.synthetic.task=arithmetic"]


@dataclasses.dataclass(frozen=True)
class Inner:
    x: int = 1
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass(frozen=True)
class Outer:
    inner: Inner = dataclasses.field(default_factory=Inner)
    ratio: float = 0.5
    name: str | None = None
    tags: list[int] = dataclasses.field(default_factory=list)
    extra: Mapping[str, int] = dataclasses.field(default_factory=dict)
    flag: bool = False


@pytest.mark.parametrize(
    "data, message",
    [
        ({"inner": {"y": 1}}, "inner.y: unknown key"),
        ({"inner": {"x": "3"}}, "inner.x: must be an integer"),
        ({"inner": {"x": True}}, "inner.x: must be an integer"),
        ({"inner": {"mode": "c"}}, "inner.mode: must be one of ['a', 'b']"),
        ({"ratio": "fast"}, "ratio: must be a number"),
        ({"tags": "1,2"}, "tags: must be a list"),
        ({"tags": [1, "x"]}, "tags[1]: must be an integer"),
        ({"extra": {"k": 1.5}}, "extra.k: must be an integer"),
        ({"flag": "yes"}, "flag: must be true or false"),
        ({"inner": 3}, "inner: expected a section"),
        ({"ratoi": 1.0}, "ratoi: unknown key (did you mean 'ratio'?)"),
    ],
)
def test_type_errors_name_the_dotted_key(data, message):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert message in str(e.value)


def test_values_are_converted():
    cfg = from_dict(Outer, {"ratio": 1, "name": None, "tags": [1, 2], "extra": {"a": 2}, "inner": {"mode": "b"}})
    assert cfg == Outer(inner=Inner(mode="b"), ratio=1.0, tags=[1, 2], extra={"a": 2})
    assert from_dict(Outer, {"ratio": "5e-4"}).ratio == 5e-4  # YAML 1.1 reads 5e-4 as a string


def test_overrides_parse_as_yaml():
    assert parse_overrides(["a.b=3", "a.c=[1, 2]", "d=null", "e=true", "f=hello"]) == {
        "a": {"b": 3, "c": [1, 2]}, "d": None, "e": True, "f": "hello"}
    for bad in ("novalue", "a..b=1", "=1"):
        with pytest.raises(ConfigError):
            parse_overrides([bad])
    with pytest.raises(ConfigError, match="both as a value and as a section"):
        parse_overrides(["a=1", "a.b=2"])


def test_derived_defaults_write_shared_settings_once():
    cfg = load_config(None, BASE + ["model.path=", "model.tiny_arch=qwen3", "run.output_dir=/tmp/o", "run.name=r",
                                    "sampling.temperature=0.7", "sampling.max_tokens=33"])
    assert cfg.model.path == "/tmp/o/r/tiny_model" == cfg.actor.model_path == cfg.rollout.engine.model
    assert cfg.actor.temperature == 0.7
    assert cfg.actor.loss.max_response_length == 33 == cfg.eval.max_tokens
    assert cfg.data.train.path == "/tmp/o/r/data/train.parquet" and cfg.data.val.path == "/tmp/o/r/data/val.parquet"
    with pytest.raises(ConfigError, match="actor.temperature .* differs from sampling.temperature"):
        load_config(None, BASE + ["sampling.temperature=0.7", "actor.temperature=1.0"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ([], "data.train: no training prompts"),
        (BASE + ["actor.layout.tp=2"], "actor.layout.tp x actor.layout.pp x actor.layout.cp = 2x1x1 = 2 does not divide resources.actor_ranks=1"),
        (BASE + ["resources.actor_ranks=2", "actor.layout.tp=4"], "actor.layout.tp=4 does not divide num_key_value_heads"),
        (BASE + ["resources.actor_ranks=2", "actor.layout.tp=2", "model.tiny.num_kv_heads=1"], "num_key_value_heads"),
        (BASE + ["resources.num_cpus=1"], "resources.num_cpus=1 is less than the actors and engines need (2"),
        (BASE + ["sampling.n=1"], "sampling.n=1: grpo needs groups of >= 2"),
        (BASE + ["sampling.max_tokens=5000"], "exceeds the model's max_position_embeddings=1024"),
        (BASE + ["warmup.steps=3", "data.synthetic=null", "data.train.path=x.parquet"], "warmup.steps > 0 needs data.synthetic"),
        (BASE + ["actor.loss.name=ppo2"], "actor.loss.name: must be a registered loss, one of"),
        (BASE + ["rollout.device=gpu"], "rollout.device='gpu' but resources.device resolves to 'cpu'"),
        (BASE + ["reward.fn=mth"], "reward.fn / reward.kwargs: reward function 'mth' is neither a built-in name"),
        (BASE + ["reward.fn=no_such_pkg.rewards:score"], "cannot import module 'no_such_pkg.rewards'"),
        (BASE + ["reward.fn=math", "reward.kwargs={strictness: 1}"], "unexpected keyword argument 'strictness'"),
    ],
)
def test_cross_checks(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("megatron_rl/configs/quickstart_cpu.yaml", ["run.steps=7"])
    path = tmp_path / "config.yaml"
    path.write_text(config_yaml(cfg))
    again = load_config(str(path))
    assert again == cfg and isinstance(again, TrainConfig)
    assert yaml.safe_load(path.read_text())["run"]["steps"] == 7


def test_quickstart_is_what_the_readme_says():
    cfg = load_config("megatron_rl/configs/quickstart_cpu.yaml")
    assert cfg.actor.loss.name == "luspo" and cfg.algorithm.lspo.enabled and cfg.algorithm.dynamic_sampling.accuracy_filter
    assert cfg.model.tiny_arch == "qwen3" and cfg.run.steps == 200 and cfg.warmup.steps == 80


def test_exclude_fully_masked_validates_and_reaches_the_actor_loss_counts():
    """actor.loss.exclude_fully_masked: bool only, default False (N = every row, as all measured results used);
    the actor builds its step's GlobalBatchCounts with `cfg.actor.loss.count_options()`, so the flag decides N."""
    from megatron_rl.actor.config import PolicyLossSettings
    from megatron_rl.algorithms import GlobalBatchCounts, policy_loss, policy_loss_share

    assert load_config(None, BASE).actor.loss.exclude_fully_masked is False
    cfg = load_config(None, BASE + ["actor.loss.exclude_fully_masked=true"])
    assert cfg.actor.loss.exclude_fully_masked is True
    for bad, message in (("1", "must be true or false, got 1"), ("'true'", "must be true or false, got 'true'"),
                         ("null", "must not be null")):
        with pytest.raises(ConfigError, match=rf"actor\.loss\.exclude_fully_masked: {message}"):
            load_config(None, BASE + [f"actor.loss.exclude_fully_masked={bad}"])
    with pytest.raises(ValueError, match="loss.exclude_fully_masked: must be true or false, got 1"):
        PolicyLossSettings(exclude_fully_masked=1)  # built in code, not from YAML

    # Two micro-batches with one fully masked row each; LUSPO's N is 4 rows by default, 2 with the flag.
    masks = [torch.tensor([[True, True, False], [False, False, False]]),
             torch.tensor([[False, False, False], [True, False, False]])]
    g = torch.Generator().manual_seed(0)
    log_probs = [-torch.rand(2, 3, generator=g, dtype=torch.float64) for _ in range(2)]
    old = [lp - 1e-3 for lp in log_probs]
    advantages = [torch.tensor([1.0, -1.0], dtype=torch.float64), torch.tensor([0.5, -0.5], dtype=torch.float64)]
    losses = {}
    for loss_cfg in (load_config(None, BASE).actor.loss, cfg.actor.loss):
        counts = GlobalBatchCounts.from_masks(masks, **loss_cfg.count_options())
        losses[loss_cfg.exclude_fully_masked] = sum(
            policy_loss_share(loss_cfg.name, lp, o, a, m, counts=counts, **loss_cfg.options())[0]
            for lp, o, a, m in zip(log_probs, old, advantages, masks))
    assert cfg.actor.loss.name == "luspo" and losses[False] != 0
    torch.testing.assert_close(losses[True], 2 * losses[False], rtol=1e-15, atol=0)  # N: 4 rows -> 2 non-empty
    whole = policy_loss("luspo", torch.cat(log_probs), torch.cat(old), torch.cat(advantages), torch.cat(masks),
                        exclude_fully_masked=True)[0]
    torch.testing.assert_close(losses[True], whole, rtol=1e-14, atol=0)  # float64, two partial sums vs one
