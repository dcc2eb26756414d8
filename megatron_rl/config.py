"""The one typed configuration tree of a training run: YAML + dotted CLI overrides, validated up front.

    cfg = load_config("megatron_rl/configs/quickstart_cpu.yaml", ["actor.layout.tp=2", "run.steps=50"])

Sections (each a frozen dataclass; components reuse the dataclasses of the modules they configure):

    run         name, output_dir, seed, steps                          -> run dir = output_dir/name
    model       path (HF folder) or tiny_arch + tiny (a random tiny model made in the run dir); optional
                megatron_checkpoint (start from a converted or trained megatron_rl checkpoint)
    data        train / val (megatron_rl.data.PromptDataConfig) or synthetic (generated into the run dir)
    reward      reward function (name or "pkg.module:fn"), workers, timeout
    algorithm   advantage estimator, prompts per step, dynamic sampling, LSPO, overlong, old log-probs, mini-batches
    actor       megatron_rl.actor.config.ActorConfig: parallel layout, dtype, packing, optimizer, policy loss
    rollout     megatron_rl.rollout.config.RolloutPoolConfig: engines (vLLM settings), timeouts, transport
    sampling    megatron_rl.rollout.types.SamplingConfig: n (= the GRPO group size), temperature, top_p, max_tokens
    eval        evaluation cadence and settings
    warmup      optional supervised warm-up before RL (synthetic tasks' reference answers)
    checkpoint  cadence, retention
    logging     JSONL / TensorBoard / wandb, progress bars
    resources   actor ranks (the Megatron world size), Ray address, CPUs/GPUs

Derived defaults (`derive_defaults`, applied to the raw mapping before typing, so a config file stays short and
two settings that must agree are written once): actor.model_path and rollout.engine.model come from model.path,
actor.megatron_checkpoint from model.megatron_checkpoint;
actor.temperature from sampling.temperature (both given and different is an error); the Dr.GRPO length constant
(actor.loss.max_response_length), the DAPO overlong limit and eval.max_tokens from sampling.max_tokens; the data
files of data.synthetic live in <run dir>/data. The resolved tree is written to <run dir>/config.yaml.

Cross-checks that need several sections (`validate_config`) run before anything expensive: parallel layout vs
model and actor ranks, CPUs/GPUs vs what the actors and engines need, group size vs advantage estimator, ...
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Sequence

from megatron_rl.actor.config import ActorConfig
from megatron_rl.algorithms import DynamicSamplingConfig, LSPOConfig, OverlongConfig
from megatron_rl.config_loader import (
    ConfigError,
    deep_merge,
    dump_yaml,
    from_dict,
    parse_overrides,
    read_yaml,
    set_dotted,
)
from megatron_rl.data.config import PromptDataConfig
from megatron_rl.errors import is_finite_number, require
from megatron_rl.models.tiny import ARCHS as TINY_ARCHS
from megatron_rl.models.tiny import TinySize
from megatron_rl.rollout.config import RolloutPoolConfig
from megatron_rl.rollout.types import SamplingConfig

__all__ = ["TrainConfig", "ConfigError", "load_config", "validate_config", "config_yaml"]


@dataclass(frozen=True)
class RunSettings:
    """name: the run's folder under output_dir (metrics, checkpoints, resolved config). steps: RL steps."""

    name: str = "run"
    output_dir: str = "runs"
    seed: int = 0
    steps: int = 10

    def __post_init__(self):
        require(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
                f"must be a non-empty folder name (no '/'), got {self.name!r}", "run")
        require(bool(self.output_dir), "output_dir", "must not be empty (runs go to output_dir/name)", "run")
        require(self.steps >= 0, "steps", f"must be >= 0, got {self.steps}", "run")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}", "run")

    @property
    def dir(self) -> str:
        return os.path.join(self.output_dir, self.name)


@dataclass(frozen=True)
class ModelSettings:
    """path: the HF folder to train (config.json, safetensors, tokenizer). With path empty and tiny_arch set,
    a random tiny model of that architecture (sizes in `tiny`) is made in <run dir>/tiny_model.

    megatron_checkpoint: a megatron_rl checkpoint directory to start from instead of path's weights: the output of
    `megatron-rl convert-from-hf` or a training checkpoint (runs/NAME/checkpoints/step_N: its model only), in any
    saved layout (it reshards on load). path stays required: it gives config.json (which must describe the same
    architecture: checked when the config loads), the tokenizer and the vLLM engines' start-up weights, which the
    checkpoint's replace before the first rollout. The KL reference starts from the checkpoint too."""

    path: str = ""
    megatron_checkpoint: str = ""
    tiny_arch: str | None = None
    tiny: TinySize = field(default_factory=TinySize)

    def __post_init__(self):
        require(self.tiny_arch is None or self.tiny_arch in TINY_ARCHS, "tiny_arch",
                f"must be one of {list(TINY_ARCHS)} or null, got {self.tiny_arch!r}", "model")
        require(bool(self.path) or self.tiny_arch is not None, "path",
                "is required (or set model.tiny_arch for a random tiny model)", "model")


@dataclass(frozen=True)
class SyntheticDataSettings:
    """Generate train/val prompts of a synthetic verifiable task (megatron_rl.data.synthetic)."""

    task: str = "arithmetic"
    difficulty: int = 1
    num_train: int = 2000
    num_val: int = 64
    seed: int = 0

    def __post_init__(self):
        from megatron_rl.tasks.registry import SYNTHETIC_TASKS

        require(self.task in SYNTHETIC_TASKS, "task", f"must be one of {sorted(SYNTHETIC_TASKS)}, got {self.task!r}",
                "synthetic")
        levels = SYNTHETIC_TASKS[self.task].levels
        require(self.difficulty in levels, "difficulty",
                f"must be one of the {self.task} levels {sorted(levels)}, got {self.difficulty!r}", "synthetic")
        require(self.num_train >= 1, "num_train", f"must be >= 1, got {self.num_train}", "synthetic")
        require(self.num_val >= 0, "num_val", f"must be >= 0 (0 = no validation set), got {self.num_val}", "synthetic")


@dataclass(frozen=True)
class DataSettings:
    train: PromptDataConfig | None = None
    val: PromptDataConfig | None = None
    synthetic: SyntheticDataSettings | None = None


@dataclass(frozen=True)
class RewardSettings:
    """fn: a built-in name (megatron_rl.rewards.BUILTIN_REWARDS: "default", "math", "format", "arithmetic",
    "countdown", "chain") or "pkg.module:function"; kwargs: options bound to every call (e.g. {extraction: lenient}
    for "math"). Both are checked when the config loads. timeout_s: per-call limit; a call past it scores 0 and is
    counted in reward/num_timeouts. in_process: "auto" scores the items a function declares bounded (the synthetic-task
    verifiers: `in_process_safe`, megatron_rl/rewards/registry.py) in the trainer's process, the rest in the workers;
    "never" sends everything to the workers."""

    fn: str = "default"
    num_workers: int = 2
    timeout_s: float = 10.0
    kwargs: dict[str, Any] = field(default_factory=dict)
    in_process: Literal["auto", "never"] = "auto"

    def __post_init__(self):
        require(self.num_workers >= 1, "num_workers", f"must be >= 1, got {self.num_workers}", "reward")
        require(is_finite_number(self.timeout_s) and self.timeout_s > 0, "timeout_s",
                f"must be a finite number of seconds > 0, got {self.timeout_s!r}", "reward")


@dataclass(frozen=True)
class AlgorithmSettings:
    """advantage: grpo | dr_grpo | rloo (group size = sampling.n). prompts_per_step: groups per training batch.
    prompts_per_round: prompts generated per over-sampling round (default prompts_per_step).
    old_log_probs: "recompute" (the actor's log-probs before the update: exact on-policy ratios and the
    train/rollout mismatch metric) or "rollout" (the engines' log-probs; saves a forward pass).
    skip_redundant_old_forward: with old_log_probs "recompute", max_staleness 0 and one mini-batch the old policy IS
    the policy being trained, so its log-probs are the training forward's own (detached): the separate forward pass is
    skipped and the ratio is exactly 1; false always runs the separate pass (for comparisons).
    mini_batches: optimizer steps per rollout batch (1 = fully on-policy).
    max_staleness: k >= 1 overlaps rollout and training: the engines generate step t + k's batch while the actor
    trains step t, so a trained sample is at most k weight versions old (asserted; logged as async/staleness_*).
    0 is the synchronous loop. Needs split engines (not resources.colocate). docs/training.md, "Asynchronous RL"."""

    advantage: str = "grpo"
    prompts_per_step: int = 8
    prompts_per_round: int | None = None
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    lspo: LSPOConfig = field(default_factory=LSPOConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    old_log_probs: Literal["recompute", "rollout"] = "recompute"
    skip_redundant_old_forward: bool = True
    mini_batches: int = 1
    max_staleness: int = 0

    def __post_init__(self):
        from megatron_rl.algorithms import ADVANTAGE_ESTIMATORS

        def need(cond: bool, field: str, problem: str) -> None:
            require(cond, field, problem, "algorithm")

        need(self.advantage in ADVANTAGE_ESTIMATORS, "advantage",
             f"must be one of {sorted(ADVANTAGE_ESTIMATORS)}, got {self.advantage!r}")
        need(self.prompts_per_step >= 1, "prompts_per_step", f"must be >= 1, got {self.prompts_per_step}")
        need(self.prompts_per_round is None or self.prompts_per_round >= 1, "prompts_per_round",
             f"must be >= 1 or null (= prompts_per_step), got {self.prompts_per_round}")
        need(self.mini_batches >= 1, "mini_batches", f"must be >= 1, got {self.mini_batches}")
        need(self.max_staleness >= 0, "max_staleness",
             f"must be >= 0 (0 = synchronous; k >= 1 = rollouts up to k weight versions old), got {self.max_staleness}")

    @property
    def reuses_training_forward(self) -> bool:
        """Whether the old log-probs are provably the training forward's own (AlgorithmSettings docstring)."""
        return (self.old_log_probs == "recompute" and self.skip_redundant_old_forward and self.max_staleness == 0
                and self.mini_batches == 1)


@dataclass(frozen=True)
class EvalSettings:
    """every: evaluate every k RL steps (0 = never during training); at_start: also before the first step.
    n: samples per prompt (avg@n, pass@k for k in pass_ks); temperature 0 = greedy."""

    every: int = 5
    at_start: bool = True
    num_prompts: int | None = None
    n: int = 1
    pass_ks: list[int] = field(default_factory=lambda: [1])
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int | None = None

    def __post_init__(self):
        def need(cond: bool, field: str, problem: str) -> None:
            require(cond, field, problem, "eval")

        need(self.every >= 0, "every", f"must be >= 0 (0 = never during training), got {self.every}")
        need(self.num_prompts is None or self.num_prompts >= 1, "num_prompts",
             f"must be >= 1 or null (all validation prompts), got {self.num_prompts}")
        need(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        need(len(self.pass_ks) > 0 and all(1 <= k <= self.n for k in self.pass_ks), "pass_ks",
             f"must be a non-empty list of k within 1..eval.n={self.n}, got {self.pass_ks}")
        need(is_finite_number(self.temperature) and self.temperature >= 0, "temperature",
             f"must be a finite number >= 0 (0 = greedy), got {self.temperature!r}")
        need(is_finite_number(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        need(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
             f"must be >= 1 or null (= sampling.max_tokens), got {self.max_tokens}")


@dataclass(frozen=True)
class WarmupSettings:
    """Supervised warm-up on the synthetic task's reference answers before RL (0 steps = off). With a KL term
    (actor.loss.kl_coef > 0) the KL reference is reset to the warmed-up policy afterwards."""

    steps: int = 0
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 12345

    def __post_init__(self):
        require(self.steps >= 0, "steps", f"must be >= 0 (0 = no warm-up), got {self.steps}", "warmup")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}", "warmup")
        require(is_finite_number(self.lr) and self.lr > 0, "lr", f"must be a finite number > 0, got {self.lr!r}",
                "warmup")


@dataclass(frozen=True)
class CheckpointSettings:
    """every: save every k RL steps (0 = only at exit); keep_last: checkpoints kept (older ones deleted)."""

    every: int = 0
    keep_last: int = 2
    at_exit: bool = True

    def __post_init__(self):
        require(self.every >= 0, "every", f"must be >= 0 (0 = only at exit), got {self.every}", "checkpoint")
        require(self.keep_last >= 1, "keep_last", f"must be >= 1, got {self.keep_last}", "checkpoint")


@dataclass(frozen=True)
class LoggingSettings:
    """jsonl / tensorboard / wandb_project: where metrics go. save_rollouts: write each step's generated groups and
    trained batch to <run dir>/rollouts/step_N.parquet (megatron_rl/training/recorder.py), which `megatron-rl
    replay-step` re-runs without engines."""

    jsonl: bool = True
    tensorboard: bool = True
    wandb_project: str | None = None
    progress_bars: bool = True
    save_rollouts: bool = False


@dataclass(frozen=True)
class ResourceSettings:
    """actor_ranks: the Megatron world size (GPUs of the training actors; CPU processes here).
    ray_address: None = start a private local Ray; "auto" = join the cluster a launcher started (Slurm script).
    num_cpus / num_gpus: what the local Ray may use (None = the machine's). device: "auto" picks gpu when CUDA
    is available. colocate: the rollout engines run on the actor ranks' resources (their Ray bundles: no CPUs or
    GPUs of their own) and hand the memory to the actors while they train (vLLM sleep mode on GPU; on CPU, where vLLM
    has no sleep mode, the same placement and hand-off protocol without the vLLM calls). See
    megatron_rl/cluster/placement.py. actor_cpus_per_rank: Ray CPUs each rank reserves; actor_threads_per_rank: its
    torch threads (None = actor_cpus_per_rank; more pays off on CPU when the actors and engines take turns on the
    same cores, as in the synchronous loop). actor_call_timeout_s: the deadline of one call on the Megatron ranks (a
    train step, a checkpoint save, a weight export); a rank still busy past it stops the run with each rank's stack.
    collective_timeout_s: torch.distributed's timeout of one collective (gloo on CPU, NCCL on GPU), the backstop for a
    hang the driver cannot see. Defaults sized for the Qwen3-30B-A3B example: its slowest call (a distributed
    checkpoint save) takes minutes, a train step a few (docs/training.md, "Failures")."""

    actor_ranks: int = 1
    ray_address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    device: Literal["auto", "cpu", "gpu"] = "auto"
    actor_cpus_per_rank: int = 1
    actor_threads_per_rank: int | None = None
    actor_call_timeout_s: float = 3600.0
    collective_timeout_s: float = 1800.0
    colocate: bool = False

    def __post_init__(self):
        def need(cond: bool, field: str, problem: str) -> None:
            require(cond, field, problem, "resources")

        need(self.actor_ranks >= 1, "actor_ranks", f"must be >= 1, got {self.actor_ranks}")
        need(self.num_cpus is None or self.num_cpus >= 1, "num_cpus", f"must be >= 1 or null, got {self.num_cpus}")
        need(self.num_gpus is None or self.num_gpus >= 0, "num_gpus", f"must be >= 0 or null, got {self.num_gpus}")
        need(self.actor_cpus_per_rank >= 1, "actor_cpus_per_rank", f"must be >= 1, got {self.actor_cpus_per_rank}")
        need(self.actor_threads_per_rank is None or self.actor_threads_per_rank >= 1, "actor_threads_per_rank",
             f"must be >= 1 or null (= actor_cpus_per_rank), got {self.actor_threads_per_rank}")
        for name in ("actor_call_timeout_s", "collective_timeout_s"):
            value = getattr(self, name)
            need(is_finite_number(value) and value > 0, name, f"must be a finite number of seconds > 0, got {value!r}")

    @property
    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class TrainConfig:
    actor: ActorConfig
    rollout: RolloutPoolConfig
    run: RunSettings = field(default_factory=RunSettings)
    model: ModelSettings = field(default_factory=lambda: ModelSettings(tiny_arch="qwen3"))
    data: DataSettings = field(default_factory=DataSettings)
    reward: RewardSettings = field(default_factory=RewardSettings)
    algorithm: AlgorithmSettings = field(default_factory=AlgorithmSettings)
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=8))
    eval: EvalSettings = field(default_factory=EvalSettings)
    warmup: WarmupSettings = field(default_factory=WarmupSettings)
    checkpoint: CheckpointSettings = field(default_factory=CheckpointSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)

    @property
    def run_dir(self) -> str:
        return self.run.dir


def _get(raw: dict, dotted: str, default=None):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def _setdefault(raw: dict, dotted: str, value) -> None:
    set_dotted(raw, dotted, value, overwrite=False)


def _is_number(value) -> bool:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return False
    return is_finite_number(value)


def derive_defaults(raw: dict) -> dict:
    """Fill the settings that follow from others (module docstring). Returns a new mapping."""
    import copy

    raw = copy.deepcopy(raw)
    run_dir = os.path.join(_get(raw, "run.output_dir", RunSettings.output_dir), _get(raw, "run.name", RunSettings.name))
    model = raw.setdefault("model", {})
    if not model.get("path"):
        model.setdefault("tiny_arch", "qwen3")  # no model given: the embedded default, a tiny Qwen3
        if model.get("tiny_arch"):
            model["path"] = os.path.join(run_dir, "tiny_model")
    path = model.get("path", "")
    _setdefault(raw, "actor.model_path", path)
    _setdefault(raw, "actor.megatron_checkpoint", model.get("megatron_checkpoint", ""))
    _setdefault(raw, "rollout.engine.model", path)
    if _get(raw, "actor.moe.routing_replay") == "rollout":  # R3: the engines report the experts they routed to
        _setdefault(raw, "rollout.engine.return_routed_experts", True)

    sampling_t, actor_t = _get(raw, "sampling.temperature"), _get(raw, "actor.temperature")
    if _is_number(sampling_t) and _is_number(actor_t) and float(sampling_t) != float(actor_t):
        raise ConfigError(
            f"actor.temperature ({actor_t}) differs from sampling.temperature ({sampling_t}): the actor must score "
            "responses at the temperature they were sampled with; set only sampling.temperature"
        )
    # A derived copy of a bad value would fail under the copy's key; copy only values of the right kind and leave bad
    # ones to their own section's check, which names the key the user wrote.
    if _is_number(sampling_t) and float(sampling_t) > 0:
        _setdefault(raw, "actor.temperature", float(sampling_t))
    max_tokens = _get(raw, "sampling.max_tokens", SamplingConfig.max_tokens)
    if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 1:
        _setdefault(raw, "actor.loss.max_response_length", max_tokens)
        if _get(raw, "algorithm.overlong.soft_penalty"):
            _setdefault(raw, "algorithm.overlong.max_response_length", max_tokens)
        _setdefault(raw, "eval.max_tokens", max_tokens)
    _setdefault(raw, "sampling.n", 8)
    device = _get(raw, "resources.device", "auto")
    if device not in ("auto", "cpu", "gpu"):
        device = None  # refused by resources.device's own check
    elif device == "auto":
        import torch

        device = "gpu" if torch.cuda.is_available() else "cpu"
    if device is not None:
        _setdefault(raw, "rollout.device", device)
    _setdefault(raw, "rollout.colocate", bool(_get(raw, "resources.colocate", False)))

    synthetic = _get(raw, "data.synthetic")
    if synthetic is not None:
        data_dir = os.path.join(run_dir, "data")
        for split in ("train", "val"):
            _setdefault(raw, f"data.{split}.path", os.path.join(data_dir, f"{split}.parquet"))
            _setdefault(raw, f"data.{split}.layout", "dapo")
    return raw


def load_config(path: str | None = None, overrides: Sequence[str] = (), *, base: dict | None = None) -> TrainConfig:
    """YAML file (optional) + overrides -> validated TrainConfig. Raises ConfigError naming the key."""
    raw = dict(base or {})
    if path:
        raw = deep_merge(raw, read_yaml(path))
    raw = deep_merge(raw, parse_overrides(overrides))
    cfg = from_dict(TrainConfig, derive_defaults(raw))
    validate_config(cfg)
    return cfg


def model_arch(cfg: TrainConfig):
    """The architecture of the model to train, without writing anything (tiny models from their sizes)."""
    from megatron_rl.models.qwen_arch import arch_from_dict, load_arch

    if cfg.model.tiny_arch and not os.path.exists(os.path.join(cfg.model.path, "config.json")):
        from megatron_rl.models.tiny import hf_config

        return arch_from_dict(hf_config(cfg.model.tiny_arch, cfg.model.tiny, eos_token_id=2, pad_token_id=0).to_dict())
    return load_arch(cfg.model.path)


def validate_config(cfg: TrainConfig) -> None:
    """Checks across sections; each error names the keys to change. Runs in seconds, before any launch."""
    from megatron_rl.models.qwen_arch import ModelConfigError
    from megatron_rl.parallel.layout import ParallelLayoutError

    try:
        arch = model_arch(cfg)
    except (ModelConfigError, FileNotFoundError) as e:
        raise ConfigError(f"model.path: {e}") from None
    try:
        cfg.actor.layout.validate(cfg.resources.actor_ranks, arch, key="actor.layout", world="resources.actor_ranks")
    except ParallelLayoutError as e:
        raise ConfigError(str(e)) from None
    if cfg.data.train is None:
        raise ConfigError("data.train: no training prompts; give data.train.path or a data.synthetic section")
    replay = cfg.actor.moe.routing_replay
    if replay != "none" and arch.moe is None:
        raise ConfigError(f"actor.moe.routing_replay={replay!r} needs a MoE model; {arch.model_type} has no experts "
                          "(set actor.moe.routing_replay=none)")
    if replay == "old_policy" and cfg.algorithm.old_log_probs != "recompute":
        raise ConfigError(f"actor.moe.routing_replay=old_policy replays the routing of the old-log-prob pass, but "
                          f"algorithm.old_log_probs={cfg.algorithm.old_log_probs!r} computes none (set "
                          "algorithm.old_log_probs=recompute, or actor.moe.routing_replay=rollout)")
    if replay == "rollout" and not cfg.rollout.engine.return_routed_experts:
        raise ConfigError("actor.moe.routing_replay=rollout needs rollout.engine.return_routed_experts=true (the "
                          "default with it; do not set it to false)")
    if cfg.algorithm.advantage in ("grpo", "rloo") and cfg.sampling.n < 2:
        raise ConfigError(f"sampling.n={cfg.sampling.n}: {cfg.algorithm.advantage} needs groups of >= 2 responses")
    if cfg.warmup.steps and cfg.data.synthetic is None:
        raise ConfigError("warmup.steps > 0 needs data.synthetic (the warm-up trains on its reference answers)")
    if cfg.actor.megatron_checkpoint:
        _check_megatron_checkpoint(cfg, arch)
    _check_reward(cfg.reward)
    if cfg.sampling.max_tokens > arch.max_position_embeddings:
        raise ConfigError(
            f"sampling.max_tokens={cfg.sampling.max_tokens} exceeds the model's max_position_embeddings="
            f"{arch.max_position_embeddings}"
        )
    device = cfg.resources.resolved_device
    if cfg.rollout.colocate != cfg.resources.colocate:
        raise ConfigError(f"rollout.colocate={cfg.rollout.colocate} but resources.colocate={cfg.resources.colocate}; "
                          "set only resources.colocate (rollout.colocate follows it)")
    if cfg.resources.colocate and cfg.algorithm.max_staleness > 0:
        raise ConfigError(
            f"algorithm.max_staleness={cfg.algorithm.max_staleness} needs split engines, but resources.colocate=true: "
            "colocated engines and actors share the devices, so one waits while the other works and there is nothing "
            "to overlap. Set algorithm.max_staleness=0 or resources.colocate=false"
        )
    if cfg.resources.colocate:
        from megatron_rl.cluster.placement import colocated_engine_bundles

        try:
            colocated_engine_bundles(cfg.rollout.num_engines, cfg.rollout.engine.tensor_parallel_size,
                                     cfg.resources.actor_ranks)
        except ValueError as e:
            raise ConfigError(f"resources.colocate=true: {e}") from None
    if device == "cpu":
        needed = required_cpus(cfg)
        if cfg.resources.num_cpus is not None and needed > cfg.resources.num_cpus:
            engines = "0 for colocated engines" if cfg.resources.colocate else \
                "rollout.num_engines x rollout.engine.cpus_per_engine"
            raise ConfigError(
                f"resources.num_cpus={cfg.resources.num_cpus} is less than the actors and engines need ({needed}: "
                f"resources.actor_ranks x actor_cpus_per_rank + {engines})"
            )
    else:
        actor_gpus = cfg.resources.actor_ranks
        engine_gpus = 0 if cfg.resources.colocate else cfg.rollout.num_engines * cfg.rollout.engine.tensor_parallel_size
        if cfg.resources.num_gpus is not None and actor_gpus + engine_gpus > cfg.resources.num_gpus:
            raise ConfigError(
                f"resources.num_gpus={cfg.resources.num_gpus} < resources.actor_ranks ({actor_gpus}) + rollout engines' "
                f"GPUs ({engine_gpus}); lower them or set resources.colocate=true"
            )
    if cfg.rollout.device != device:
        raise ConfigError(f"rollout.device={cfg.rollout.device!r} but resources.device resolves to {device!r}")


def required_cpus(cfg: TrainConfig) -> int:
    """Ray CPUs the actors and engines reserve: actor_ranks x actor_cpus_per_rank, plus num_engines x
    cpus_per_engine unless colocated (colocated engines run in the actors' bundles with no CPU of their own,
    megatron_rl/cluster/placement.py). The config check and the trainer's local Ray cluster both use it."""
    actors = cfg.resources.actor_ranks * cfg.resources.actor_cpus_per_rank
    if cfg.resources.colocate:
        return actors
    return actors + cfg.rollout.num_engines * cfg.rollout.engine.cpus_per_engine


def _check_megatron_checkpoint(cfg: TrainConfig, arch) -> None:
    """A finished checkpoint of model.path's architecture, every shard present: checked from its JSON and DCP
    metadata (`checkpoint.model_ckpt.check_model_checkpoint`), before Ray or any engine starts."""
    from megatron_rl.checkpoint.dcp_reader import DistCheckpointError
    from megatron_rl.checkpoint.format import CheckpointFormatError
    from megatron_rl.checkpoint.model_ckpt import check_model_checkpoint
    from megatron_rl.models.qwen_arch import ModelConfigError

    ckpt = cfg.actor.megatron_checkpoint
    key = "model.megatron_checkpoint" if ckpt == cfg.model.megatron_checkpoint else "actor.megatron_checkpoint"
    try:
        check_model_checkpoint(ckpt, arch, what=f"model.path's config.json ({cfg.model.path})")
    except (CheckpointFormatError, DistCheckpointError, ModelConfigError) as e:
        raise ConfigError(
            f"{key}={ckpt}: {e}\nFix: point {key} at a finished megatron_rl checkpoint of the model at model.path "
            "(the directory holding megatron_rl.json: a convert-from-hf output or runs/NAME/checkpoints/step_N), or "
            f"set {key}='' to start from model.path's weights"
        ) from None


def _check_reward(reward: RewardSettings) -> None:
    """Import the reward function and bind reward.kwargs now (milliseconds), not when the reward workers start."""
    from megatron_rl.rewards import RewardFunctionError, resolve_reward_fn

    try:
        resolve_reward_fn(reward.fn, dict(reward.kwargs))
    except RewardFunctionError as e:
        raise ConfigError(f"reward.fn / reward.kwargs: {e}") from None


def config_yaml(cfg: TrainConfig) -> str:
    return dump_yaml(cfg)


# Settings a resumed run may change: they decide how long, how fast, where to and how verbosely it runs, or how long
# it waits for a failing part, never what it computes from the checkpoint on. Every other key is refused on resume
# (`changed_math`), with the differing keys listed, unless the user says --allow-config-change.
RESUME_SAFE_KEYS = (
    "run.steps", "run.output_dir", "logging.", "checkpoint.", "eval.", "warmup.",
    "resources.ray_address", "resources.num_cpus", "resources.num_gpus", "resources.actor_call_timeout_s",
    "resources.collective_timeout_s", "resources.actor_threads_per_rank", "resources.actor_cpus_per_rank",
    "rollout.request_timeout_s", "rollout.startup_timeout_s", "rollout.weight_sync_timeout_s",
    "rollout.max_attempts", "rollout.engine.threads", "rollout.engine.cpus_per_engine", "rollout.engine.env",
    "reward.num_workers", "reward.timeout_s", "reward.in_process",
)


def _flatten(tree, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def changed_math(saved: dict, current: dict) -> list[str]:
    """'key: saved -> current' for every setting that differs between a checkpoint's config and the current one and
    is not in RESUME_SAFE_KEYS (a prefix ending in '.' covers a section)."""
    old, new = _flatten(saved), _flatten(current)
    lines = []
    for key in sorted(set(old) | set(new)):
        if any(key == safe or (safe.endswith(".") and key.startswith(safe)) for safe in RESUME_SAFE_KEYS):
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines
