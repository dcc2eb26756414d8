"""Every option of the config tree is checked when the config loads (docs/design.md, config contract): a refused
value fails in `load_config` (and so in `megatron-rl train` and `--print-config`) before any process starts, with a
message that starts with the full dotted key and says what is accepted. One case per refused value."""
import pytest

from megatron_rl.cli import main as cli_main
from megatron_rl.config import ConfigError, load_config

QUICKSTART = "megatron_rl/configs/quickstart_cpu.yaml"

# (override, the message's start: the dotted key, and a piece of the accepted range)
REFUSED = [
    # actor.loss: the policy loss
    ("actor.loss.name=ppo2", "actor.loss.name:", "registered loss"),
    ("actor.loss.clip_low=1.2", "actor.loss.clip_low:", "[0, 1)"),
    ("actor.loss.clip_low=-0.1", "actor.loss.clip_low:", "[0, 1)"),
    ("actor.loss.clip_high=-1", "actor.loss.clip_high:", ">= 0"),
    ("actor.loss.clip_high=.inf", "actor.loss.clip_high:", "finite"),
    ("actor.loss.aggregation=seq-sum", "actor.loss.aggregation:", "token-mean"),
    ("actor.loss.kl_coef=nan", "actor.loss.kl_coef:", "finite"),
    ("actor.loss.kl_coef=.nan", "actor.loss.kl_coef:", "finite"),
    ("actor.loss.kl_coef=-0.1", "actor.loss.kl_coef:", ">= 0"),
    ("actor.loss.kl_estimator=k4", "actor.loss.kl_estimator:", "k3"),
    ("actor.loss.entropy_coef=inf", "actor.loss.entropy_coef:", "finite"),
    ("actor.loss.tis_cap=0", "actor.loss.tis_cap:", "> 0"),
    ("actor.loss.max_response_length=0", "actor.loss.max_response_length:", ">= 1"),
    ("actor.loss.exclude_fully_masked=1", "actor.loss.exclude_fully_masked:", "true or false"),
    # actor: optimizer and the rest
    ("actor.optimizer.name=lamb", "actor.optimizer.name:", "adam or sgd"),
    ("actor.optimizer.lr=0", "actor.optimizer.lr:", "> 0"),
    ("actor.optimizer.lr=nan", "actor.optimizer.lr:", "finite"),
    ("actor.optimizer.min_lr=1", "actor.optimizer.min_lr:", "[0, lr="),
    ("actor.optimizer.weight_decay=-1", "actor.optimizer.weight_decay:", ">= 0"),
    ("actor.optimizer.adam_beta1=1.0", "actor.optimizer.adam_beta1:", "[0, 1)"),
    ("actor.optimizer.adam_beta2=-0.5", "actor.optimizer.adam_beta2:", "[0, 1)"),
    ("actor.optimizer.adam_eps=0", "actor.optimizer.adam_eps:", "> 0"),
    ("actor.optimizer.clip_grad=-1", "actor.optimizer.clip_grad:", ">= 0"),
    ("actor.optimizer.warmup_steps=-1", "actor.optimizer.warmup_steps:", ">= 0"),
    ("actor.optimizer.decay_steps=0", "actor.optimizer.decay_steps:", ">= 1"),
    ("actor.optimizer.decay_style=step", "actor.optimizer.decay_style:", "cosine"),
    ("actor.dtype=float16", "actor.dtype:", "bfloat16"),
    ("actor.max_tokens_per_microbatch=0", "actor.max_tokens_per_microbatch:", ">= 1"),
    ("actor.moe_aux_loss_coeff=-1", "actor.moe_aux_loss_coeff:", ">= 0"),
    ("actor.layout.tp=0", "actor.layout.tp:", "positive integer"),
    ("actor.layout.vpp=2", "actor.layout.vpp:", "needs pp > 1"),
    ("actor.layout.sequence_parallel=true", "actor.layout.sequence_parallel:", "needs tp > 1"),
    ("actor.layout.tp=3", "actor.layout.tp=3 does not divide", "num_attention_heads"),
    ("actor.layout.pp=2", "actor.layout.tp x actor.layout.pp x actor.layout.cp = 1x2x1 = 2 does not divide",
     "resources.actor_ranks=1"),
    ("actor.layout.ep=2", "actor.layout.ep=2 needs a MoE model", "no experts"),
    # sampling
    ("sampling.n=0", "sampling.n:", ">= 1"),
    ("sampling.temperature=-1", "sampling.temperature:", ">= 0"),
    ("sampling.top_p=0", "sampling.top_p:", "(0, 1]"),
    ("sampling.top_k=-2", "sampling.top_k:", ">= 1"),
    ("sampling.max_tokens=0", "sampling.max_tokens:", ">= 1"),
    # algorithm (and its sections)
    ("algorithm.advantage=ppo", "algorithm.advantage:", "grpo"),
    ("algorithm.prompts_per_step=0", "algorithm.prompts_per_step:", ">= 1"),
    ("algorithm.prompts_per_round=0", "algorithm.prompts_per_round:", ">= 1"),
    ("algorithm.mini_batches=0", "algorithm.mini_batches:", ">= 1"),
    ("algorithm.old_log_probs=actor", "algorithm.old_log_probs:", "recompute"),
    ("algorithm.dynamic_sampling.max_rounds=0", "algorithm.dynamic_sampling.max_rounds:", ">= 1"),
    ("algorithm.dynamic_sampling.on_cap=drop", "algorithm.dynamic_sampling.on_cap:", "top_up"),
    ("algorithm.dynamic_sampling.reward_equal_atol=-1", "algorithm.dynamic_sampling.reward_equal_atol:", ">= 0"),
    ("algorithm.lspo.low_quantile=0", "algorithm.lspo.low_quantile:", "(0, 1]"),
    ("algorithm.lspo.high_quantile=0.1", "algorithm.lspo.high_quantile:", "low_quantile <= high_quantile"),
    ("algorithm.lspo.keep=middle", "algorithm.lspo.keep:", "short"),
    ("algorithm.overlong.penalty_factor=-1", "algorithm.overlong.penalty_factor:", ">= 0"),
    # rollout
    ("rollout.num_engines=0", "rollout.num_engines:", ">= 1"),
    ("rollout.request_timeout_s=0", "rollout.request_timeout_s:", "> 0"),
    ("rollout.max_attempts=0", "rollout.max_attempts:", ">= 1"),
    ("rollout.engine.cpu_kv_cache_gib=0", "rollout.engine.cpu_kv_cache_gib:", ">= 1"),
    ("rollout.engine.logprobs_mode=logits", "rollout.engine.logprobs_mode:", "processed_logprobs"),
    ("rollout.engine.gpu_memory_utilization=1.5", "rollout.engine.gpu_memory_utilization:", "(0, 1]"),
    ("rollout.engine.tensor_parallel_size=2", "rollout.engine.tensor_parallel_size:", "tensor_parallel_size=1"),
    ("rollout.transport=nccl", "rollout.transport: is 'nccl' on device 'cpu'", "use transport 'gloo' on CPU"),
    ("rollout.transport=cuda_ipc", "rollout.transport: is 'cuda_ipc'", "use 'ipc' for CUDA IPC with colocated engines"),
    ("rollout.transport=nccl_m2n", "rollout.transport: is 'nccl_m2n'", "nccl_m2n is not offered"),
    ("rollout.transport=ipc", "rollout.transport: is 'ipc' with split engines", "set resources.colocate=true"),
    # reward, data, eval, warm-up, checkpoint, run, model, resources
    ("reward.num_workers=0", "reward.num_workers:", ">= 1"),
    ("reward.timeout_s=0", "reward.timeout_s:", "> 0"),
    ("data.synthetic.task=sudoku", "data.synthetic.task:", "arithmetic"),
    ("data.synthetic.difficulty=99", "data.synthetic.difficulty:", "levels"),
    ("data.synthetic.num_train=0", "data.synthetic.num_train:", ">= 1"),
    ("data.train.max_prompt_len=0", "data.train.max_prompt_len:", ">= 1"),
    ("data.train.on_invalid=ignore", "data.train.on_invalid:", "'error', 'skip'"),
    ("eval.every=-1", "eval.every:", ">= 0"),
    ("eval.pass_ks=[2]", "eval.pass_ks:", "within 1..eval.n=1"),
    ("eval.temperature=-1", "eval.temperature:", ">= 0"),
    ("eval.top_p=2", "eval.top_p:", "(0, 1]"),
    ("warmup.steps=-1", "warmup.steps:", ">= 0"),
    ("warmup.lr=0", "warmup.lr:", "> 0"),
    ("checkpoint.keep_last=0", "checkpoint.keep_last:", ">= 1"),
    ("checkpoint.every=-5", "checkpoint.every:", ">= 0"),
    ("run.steps=-1", "run.steps:", ">= 0"),
    ("run.name=a/b", "run.name:", "folder name"),
    ("model.tiny.num_kv_heads=3", "model.tiny.num_kv_heads:", "divide num_attention_heads"),
    ("model.tiny.hidden_size=0", "model.tiny.hidden_size:", ">= 1"),
    ("model.tiny_arch=llama", "model.tiny_arch:", "qwen3"),
    ("resources.actor_ranks=0", "resources.actor_ranks:", ">= 1"),
    ("resources.actor_cpus_per_rank=0", "resources.actor_cpus_per_rank:", ">= 1"),
    ("resources.device=tpu", "resources.device:", "gpu"),
    # types
    ("sampling.n=two", "sampling.n:", "integer"),
    ("actor.packing=yes please", "actor.packing:", "true or false"),
    ("actor.loss.nme=luspo", "actor.loss.nme:", "did you mean 'actor.loss.name'"),
]


@pytest.mark.parametrize("override, key, accepted", REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_at_load_with_the_dotted_key(override, key, accepted):
    with pytest.raises(ConfigError) as error:
        load_config(QUICKSTART, [override])
    message = str(error.value)
    assert message.startswith(key), message
    assert accepted in message, message


def test_overlong_lengths_are_checked_once_the_penalty_is_on():
    with pytest.raises(ConfigError, match=r"^algorithm\.overlong\.cache_length: must be an int in \[1, "):
        load_config(QUICKSTART, ["algorithm.overlong.soft_penalty=true", "algorithm.overlong.cache_length=400"])


def test_data_errors_name_the_config_key(tmp_path):
    """Data files are read before Ray or any engine starts (the trainer's first step, exit 2); their errors name the
    key of the section they came from (data.train / data.val), not a generic "data"."""
    from megatron_rl.data import DataError, PromptDataConfig, build_prompt_dataset

    with pytest.raises(DataError, match=r"^data\.train\.path: file not found: .*missing\.parquet"):
        build_prompt_dataset(PromptDataConfig(path=str(tmp_path / "missing.parquet")), None, key="data.train")
    (tmp_path / "a.parquet").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DataError, match=r"^data\.val\.path: files must all be \.parquet or all"):
        build_prompt_dataset(PromptDataConfig(path=[str(tmp_path / "a.parquet"), str(tmp_path / "b.jsonl")]), None,
                             key="data.val")


@pytest.mark.parametrize("override, key", [("actor.loss.clip_low=1.2", "actor.loss.clip_low:"),
                                            ("actor.loss.kl_coef=nan", "actor.loss.kl_coef:")])
def test_train_and_print_config_exit_2_before_anything_starts(override, key, capsys):
    for extra in ([], ["--print-config"]):
        assert cli_main(["train", *extra, override]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"config error: {key}"), err


def test_the_quickstart_itself_loads():
    cfg = load_config(QUICKSTART)
    assert cfg.actor.loss.name == "luspo" and cfg.run.steps == 200


def test_asynchronous_rollouts_with_colocated_engines_are_refused():
    with pytest.raises(ConfigError, match=r"^algorithm\.max_staleness=1 needs split engines, but resources\.colocate"):
        load_config(QUICKSTART, ["algorithm.max_staleness=1", "resources.colocate=true"])


@pytest.mark.parametrize("override, key", [("algorithm.max_staleness=-1", "algorithm.max_staleness:"),
                                            ("actor.loss.off_policy.mis=tokens", "actor.loss.off_policy.mis:"),
                                            ("actor.loss.off_policy.icepop_low=0.5",
                                             "actor.loss.off_policy.icepop_high:"),
                                            ("actor.loss.off_policy.seq_tis_cap=0", "actor.loss.off_policy.seq_tis_cap:"),
                                            ("resources.actor_call_timeout_s=0", "resources.actor_call_timeout_s:"),
                                            ("resources.collective_timeout_s=nan", "resources.collective_timeout_s:"),
                                            ("rollout.engine.threads=0", "rollout.engine.threads:"),
                                            ("reward.in_process=always", "reward.in_process:"),
                                            ("actor.moe.routing_replay=everything", "actor.moe.routing_replay:"),
                                            ("actor.moe.routing_replay=old_policy",
                                             "actor.moe.routing_replay='old_policy' needs a MoE model"),
                                            # the quickstart's model is a dense Qwen3
                                            ("actor.moe.routing_replay=rollout",
                                             "actor.moe.routing_replay='rollout' needs a MoE model")])
def test_the_new_settings_of_this_round_are_checked(override, key):
    with pytest.raises(ConfigError) as error:
        load_config(QUICKSTART, [override])
    assert str(error.value).startswith(key), str(error.value)


def test_old_policy_routing_replay_needs_a_recomputed_old_policy_pass():
    with pytest.raises(ConfigError, match=r"^actor\.moe\.routing_replay=old_policy replays the routing of the "
                                          r"old-log-prob pass, but algorithm\.old_log_probs='rollout'"):
        load_config("examples/configs/qwen3_moe_tiny_cpu.yaml",
                    ["actor.moe.routing_replay=old_policy", "algorithm.old_log_probs=rollout"])
    cfg = load_config("examples/configs/qwen3_moe_tiny_cpu.yaml", ["actor.moe.routing_replay=old_policy"])
    assert cfg.actor.moe.routing_replay == "old_policy"


def _gpu_first_run_commands() -> list[list[str]]:
    """The `megatron-rl train` lines of docs/installation.md's "First run on GPUs", as override lists."""
    text = open("docs/installation.md").read().split("## First run on GPUs", 1)[1]
    return [line.split("#", 1)[0].split()[2:] for line in text.splitlines()
            if line.strip().startswith("megatron-rl train ")]


def test_the_documented_first_gpu_runs_pass_the_config_check():
    """The three quickstart runs the docs give a first GPU machine load and check (the GPUs themselves are not
    checked here), and between them take every GPU weight-sync path: gloo and nccl split, ipc colocated."""
    commands = _gpu_first_run_commands()
    configs = [load_config(QUICKSTART, overrides) for overrides in commands]
    assert len(configs) == 3 and all(c.resources.resolved_device == c.rollout.device == "gpu" for c in configs)
    assert [(c.rollout.transport, c.resources.colocate) for c in configs] == [("gloo", False), ("nccl", False),
                                                                             ("ipc", True)]
    assert len({c.run.name for c in configs}) == 3  # three run folders: one does not refuse the next
