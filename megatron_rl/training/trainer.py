"""The RL loop: rollout -> reward -> filter -> advantages -> old log-probs -> train -> sync -> evaluate -> log -> save.

    cfg = load_config("megatron_rl/configs/quickstart_cpu.yaml")
    Trainer(cfg).run()                      # or Trainer(cfg, resume=True).run()

One step (`_rl_step`):
  1. `_collect`: generate rounds of prompts with the vLLM pool (n samples each), score them with the reward pool,
     shape rewards (DAPO overlong penalty), and let dynamic sampling + LSPO keep groups until the batch is full or
     the round cap is hit (`algorithms.fill_batch`, decided once, here on the driver);
  2. `_train`: advantages (GRPO / Dr.GRPO / RLOO) over each group; the actor batch (prompt + response ids, rollout
     log-probs, loss masks with optional masking of truncated responses);
  3. old log-probs recomputed by the actor (exact on-policy ratios; the train/rollout mismatch metric; taken from
     the training forward itself when provably the same, AlgorithmSettings.reuses_training_forward) or taken
     from the rollout; reference log-probs when a KL term is on;
  4. `algorithm.mini_batches` optimizer steps of the configured policy loss (LUSPO by default);
  5. the new weights stream from the Megatron ranks to every vLLM engine (in place, bucketed);
  6. evaluation every `eval.every` steps, metrics to JSONL/TensorBoard, a one-line summary, a checkpoint every
     `checkpoint.every` steps (atomic; model + optimizer + sampler + RNG + metrics history).
SIGTERM/SIGINT (e.g. `scancel`) finish the current step, save a checkpoint and exit; `--resume` continues from the
latest complete checkpoint with nothing lost or repeated.

With `algorithm.max_staleness = k >= 1` item 1 (`_collect`) runs in a background thread for the next k steps while the actor
trains (`_rl_step_async`, training/async_rollouts.py: a fixed schedule, so the run stays reproducible); generated
but not yet trained batches are saved with each checkpoint.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import signal
import time
import warnings

import torch

from megatron_rl.checkpoint.names import CHECKPOINTS_DIR, PENDING_ROLLOUTS, PENDING_ROUTING, RUN_CONFIG
from megatron_rl.config import TrainConfig, config_yaml, required_cpus
from megatron_rl.checkpoint.run_state import (
    latest_checkpoint,
    load_trainer_state,
    remove_unfinished,
    restore_metrics,
    save_training_checkpoint,
)
from megatron_rl.faults import inject
from megatron_rl.training.experience import Rollouts, build_actor_batch, generate_grouped, rollout_stats, score_round
from megatron_rl.training.recorder import ROLLOUTS_DIR, save_step_rollouts
from megatron_rl.training.update import policy_update
from megatron_rl.training.metrics_logger import MetricsLogger, summary_line
from megatron_rl.training.timing import StepTimer

logger = logging.getLogger("megatron_rl")


def start_actor_group(cfg: TrainConfig, *, log_dir: str | None = None, gpu_share: float = 1.0):
    """The Megatron ranks of `cfg` (actor settings, resources) as an ActorGroup, on the Ray cluster already started:
    what training and `megatron-rl replay-step` both run."""
    from megatron_rl.actor.ray_group import ActorGroup

    resources = cfg.resources
    return ActorGroup(cfg.actor, resources.actor_ranks, device=resources.resolved_device,
                      cpus_per_rank=resources.actor_cpus_per_rank, threads_per_rank=resources.actor_threads_per_rank,
                      timeout_s=resources.actor_call_timeout_s, collective_timeout_s=resources.collective_timeout_s,
                      log_dir=log_dir, gpu_share=gpu_share)


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: bool = False, allow_config_change: bool = False, echo=print):
        """resume: continue from the run directory's latest complete checkpoint (a fresh start when there is none);
        allow_config_change: resume even if settings that change the math differ from the checkpoint's."""
        self.cfg = cfg
        self.resume = resume
        self.allow_config_change = allow_config_change
        self.echo = echo
        self.run_dir = cfg.run_dir
        self.ckpt_root = os.path.join(self.run_dir, CHECKPOINTS_DIR)
        self.step = 0
        self.weights_version = 0
        self._stop_requested = False
        self._last_saved_step = None
        self._restored_rollouts: dict[int, Rollouts] = {}  # generated, not yet trained batches of a resumed async run
        self._producer = None
        self._failed = False
        self._local_cpus: int | None = None  # the CPUs of the local Ray cluster this trainer started
        self.group = self.pool = self.reward_pool = self.metrics = None

    # ------------------------------------------------------------------------------------------ set-up
    def _prepare_files(self) -> None:
        """Run dir, resolved config, tiny model, synthetic data: cheap and checked before anything starts."""
        cfg = self.cfg
        existing = latest_checkpoint(self.ckpt_root)
        if existing and not self.resume:
            raise FileExistsError(
                f"{self.run_dir} already holds checkpoints (latest: step {existing[0]}); pass --resume to continue it "
                "or choose another run.name"
            )
        os.makedirs(self.run_dir, exist_ok=True)
        with open(os.path.join(self.run_dir, "config.yaml"), "w", encoding="utf-8") as f:
            f.write(config_yaml(cfg))
        if cfg.model.tiny_arch and not os.path.exists(os.path.join(cfg.model.path, "config.json")):
            from megatron_rl.models.tiny import make_tiny_model

            self.echo(f"[setup] making a random tiny {cfg.model.tiny_arch} model in {cfg.model.path}")
            make_tiny_model(cfg.model.tiny_arch, cfg.model.path, size=cfg.model.tiny, seed=cfg.run.seed)
        if cfg.data.synthetic is not None:
            from megatron_rl.data.synthetic.export import write_synthetic_dataset

            syn = cfg.data.synthetic
            for split, data_cfg, count, seed in (("train", cfg.data.train, syn.num_train, syn.seed),
                                                  ("val", cfg.data.val, syn.num_val, syn.seed + 1)):
                if data_cfg is not None and count and not os.path.exists(data_cfg.path):
                    write_synthetic_dataset(data_cfg.path, syn.task, count, seed=seed, difficulty=syn.difficulty, split=split)

    def _load_data(self) -> None:
        from transformers import AutoTokenizer

        from megatron_rl.data import ResumableSampler, build_prompt_dataset

        cfg = self.cfg
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.train_data = build_prompt_dataset(cfg.data.train, self.tokenizer, key="data.train")
        if len(self.train_data) == 0:
            raise ValueError(f"data.train ({cfg.data.train.path}) has no usable prompts")
        synthetic_without_val = cfg.data.synthetic is not None and cfg.data.synthetic.num_val == 0
        self.val_data = None
        if cfg.data.val is not None and not synthetic_without_val:
            self.val_data = build_prompt_dataset(cfg.data.val, self.tokenizer, key="data.val")
        self.sampler = ResumableSampler(len(self.train_data), seed=cfg.run.seed)
        self.echo(f"[setup] {len(self.train_data)} training prompts"
                  + (f", {len(self.val_data)} validation prompts" if self.val_data else ""))

    def _start_services(self) -> None:
        import ray

        from megatron_rl.rewards import RewardPool
        from megatron_rl.cluster.placement import COLOCATED_GPU_SHARE, ColocatedPlacement
        from megatron_rl.rollout.pool import RolloutPool
        from megatron_rl.cluster.ray_cluster import start_local_ray_cluster

        cfg = self.cfg
        self.reward_pool = RewardPool(cfg.reward.fn, num_workers=cfg.reward.num_workers, timeout_s=cfg.reward.timeout_s,
                                      fn_kwargs=dict(cfg.reward.kwargs), in_process=cfg.reward.in_process)
        device = cfg.resources.resolved_device
        if cfg.resources.ray_address is None:
            num_cpus = cfg.resources.num_cpus or max(required_cpus(cfg), os.cpu_count() or 1)
            start_local_ray_cluster(num_cpus=num_cpus, num_gpus=cfg.resources.num_gpus)
            self._owns_ray = True
            self._local_cpus = num_cpus
        else:
            ray.init(address=cfg.resources.ray_address, log_to_driver=False)
            self._owns_ray = False
        source = cfg.actor.megatron_checkpoint or cfg.actor.model_path
        colocate = cfg.resources.colocate
        engines = (f"[setup] starting {cfg.rollout.num_engines} vLLM engine(s) on {device} (weights over "
                   f"{cfg.rollout.transport}, sent by the {cfg.rollout.resolved_weight_sender})")
        if not colocate:  # split engines start in the background while the actors set up (and warm up)
            self.echo(engines)
            self.pool = RolloutPool(cfg.rollout, wait=False)
        self.echo(f"[setup] starting {cfg.resources.actor_ranks} Megatron rank(s) "
                  f"({cfg.actor.layout.describe(cfg.resources.actor_ranks)}) from {source}")
        self.group = start_actor_group(cfg, log_dir=os.path.join(self.run_dir, "logs"),
                                       gpu_share=COLOCATED_GPU_SHARE if colocate and device == "gpu" else 1.0)
        if colocate:  # colocated engines run in the actor group's placement group: after it exists
            self.echo(engines + " colocated with the actor ranks")
            placement = ColocatedPlacement.on(self.group.placement_group, cfg.resources.actor_ranks,
                                              cfg.rollout.num_engines, cfg.rollout.engine.tensor_parallel_size)
            self.pool = RolloutPool(cfg.rollout, colocated_with=placement)

    # ---------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        cfg = self.cfg
        resume_from = latest_checkpoint(self.ckpt_root) if self.resume else None
        if resume_from is not None:  # before anything is written: a refused resume leaves the run as it was
            self._check_resumable(resume_from[1])
        self._prepare_files()
        self._load_data()
        if self.resume:
            removed = remove_unfinished(self.ckpt_root)
            if removed:
                self.echo(f"[resume] removed unfinished checkpoint directories: {removed}")
            if resume_from is None:  # e.g. a requeued job killed before its first checkpoint
                self.echo(f"[resume] no complete checkpoint in {self.ckpt_root}: starting from step 0")
        metrics_path = os.path.join(self.run_dir, "metrics.jsonl")
        if resume_from is not None:
            restore_metrics(resume_from[1], metrics_path)
        self.metrics = MetricsLogger(
            self.run_dir, jsonl=cfg.logging.jsonl, tensorboard=cfg.logging.tensorboard,
            wandb_project=cfg.logging.wandb_project, run_name=cfg.run.name,
            resume_step=resume_from[0] if resume_from else None,
        )
        previous_handlers = {}
        last: dict = {}
        try:
            self._start_services()
            # after ray.init, which installs its own SIGTERM handler: ours lets the current step finish and save
            previous_handlers = self._install_signal_handlers()
            self._prepare_policy(resume_from)
            if resume_from is None and cfg.eval.at_start and self._eval_enabled():
                self.metrics.log(0, self._evaluate())
            last = self._loop()
        except BaseException:
            self._failed = True  # no graceful shutdown: live ranks may be blocked in a collective with a dead one
            raise
        finally:
            self._restore_signal_handlers(previous_handlers)
            self.shutdown()
        return last

    def _prepare_policy(self, resume_from: tuple[int, str] | None) -> None:
        """Bring the actor to the weights step 1 trains from, then make the engines generate with them.

        The actor set itself up from model.megatron_checkpoint when set, else from model.path; then either a resume
        loads the checkpoint (model, optimizer, sampler, step) or the optional warm-up trains. The engines started
        from model.path's weights, so they are synced whenever the actor's differ from those: after a resume, a
        warm-up, or a start from model.megatron_checkpoint (docs/design.md, contract 4: rollout and training see the same
        weights from the first step on).
        """
        if resume_from is not None:
            self._resume(*resume_from)
            if self.weights_version > 0:  # the same weights version as before the stop: staleness counts stay true
                self.pool.sync_weights(self._weights(), version=self.weights_version)
            return
        if self._warmup() or bool(self.cfg.actor.megatron_checkpoint):
            self._sync_weights()

    def _loop(self) -> dict:
        from tqdm import tqdm

        cfg = self.cfg
        last = {}
        # disable=None: a bar on terminals only; logs (CI, Slurm) get just the one-line summaries
        bar = tqdm(total=cfg.run.steps, initial=self.step, desc="RL steps", unit="step", dynamic_ncols=True,
                   disable=None if cfg.logging.progress_bars else True)
        k = cfg.algorithm.max_staleness
        if k > 0 and self.step < cfg.run.steps:
            from megatron_rl.training.async_rollouts import RolloutProducer

            self._producer = RolloutProducer(self._collect, first=self.step + 1, last=cfg.run.steps,
                                             pending=self._restored_rollouts)
            self._producer.allow(self.step + 1 + k)
        try:
            while self.step < cfg.run.steps and not self._stop_requested:
                inject("trainer.step")
                if self._producer is None:
                    metrics = self._rl_step(self.step + 1)
                else:
                    metrics = self._rl_step_async(self.step + 1)
                self.step += 1
                if self._eval_enabled() and cfg.eval.every and (self.step % cfg.eval.every == 0 or self.step == cfg.run.steps):
                    metrics.update(self._evaluate())
                self.metrics.log(self.step, metrics)
                bar.update(1)
                bar.write(summary_line(self.step, cfg.run.steps, metrics))
                last = metrics
                if cfg.checkpoint.every and self.step % cfg.checkpoint.every == 0:
                    self._save()
                if self._producer is not None:  # the next batch may now be generated, with the new weights
                    self._producer.allow(self.step + 1 + k)
        finally:
            bar.close()
            if self._producer is not None:
                self._producer.stop(timeout=30)  # it is idle between steps; a hung generation ends with the pool
        if self._stop_requested:
            self.echo(f"[stop] signal received: saving a checkpoint at step {self.step} and exiting")
        if (cfg.checkpoint.at_exit or self._stop_requested) and self._last_saved_step != self.step and self.step > 0:
            self._save()
        return last

    # --------------------------------------------------------------------------------------------- step
    def _round_seed(self, step: int, round_index: int) -> int:
        return (self.cfg.run.seed * 1_000_003 + step * 10_007 + round_index) % (2**31 - 1)

    def _collect(self, step: int) -> Rollouts:
        """Rollouts of step `step`: generation rounds (sampler, engines, reward pool) until dynamic sampling + LSPO
        have kept `prompts_per_step` groups or hit their cap; one decision, on the driver (contract 3)."""
        from megatron_rl.algorithms import DynamicSamplingCapWarning, cap_message, fill_batch
        from megatron_rl.rewards import RewardMetrics

        cfg, algo = self.cfg, self.cfg.algorithm
        timer = StepTimer()
        reward_metrics = [RewardMetrics()]
        generated = []  # every scored group of the step, kept or not: the policy's actual performance
        per_round = algo.prompts_per_round or algo.prompts_per_step

        def generate_round(round_index: int):
            indices = self.sampler.next_indices(per_round)
            prompts = [self.train_data.examples[i] for i in indices]
            sampling = dataclasses.replace(cfg.sampling, seed=self._round_seed(step, round_index))
            with timer("rollout"):
                completions = self.pool.generate([p.prompt_token_ids for p in prompts], sampling)
            with timer("reward"):
                outcomes, round_metrics = score_round(prompts, completions, self.reward_pool, algo.overlong, cfg.sampling.n)
            reward_metrics[0] = reward_metrics[0].merge(round_metrics)
            generated.extend(o.payload for o in outcomes)
            return outcomes

        with warnings.catch_warnings():  # the cap is reported below, with the step (also from the producer thread)
            warnings.simplefilter("ignore", DynamicSamplingCapWarning)
            filled = fill_batch(generate_round, algo.prompts_per_step, algo.dynamic_sampling,
                                algo.lspo if algo.lspo.enabled else None)
        messages = [cap_message(filled.metrics, algo.dynamic_sampling)] if filled.metrics.cap_hit else []
        metrics = {f"sampling/{k}": v for k, v in filled.metrics.as_dict().items()}
        metrics.update(reward_metrics[0].to_dict(prefix="reward/"))
        metrics.update(rollout_stats(generated, prefix="rollout/"))
        metrics["sampling/prompt_rows"] = [g.prompt.row for g in generated]
        groups = filled.payloads
        if groups:
            metrics.update(rollout_stats(groups, prefix="batch/"))
        else:
            messages.append(f"no usable group after {len(filled.rounds)} round(s): skipping the update")
        return Rollouts(step, groups, metrics, dict(timer.seconds), messages, generated)

    def _rl_step(self, step: int) -> dict:
        """The synchronous step: collect, train, sync the weights (the reference loop, max_staleness 0)."""
        cfg = self.cfg
        timer = StepTimer()
        if cfg.resources.colocate:  # colocate/handoff lists this step's events; the set-up's sync is not one of them
            self.pool.take_handoff_events()
        rollouts = self._collect(step)
        for name, seconds in rollouts.seconds.items():
            timer.seconds[name] += seconds
        metrics = self._report(rollouts)
        if not rollouts.groups:
            metrics.update(timer.breakdown())
            return metrics
        with timer("train"):
            metrics.update(self._train(rollouts))
        with timer("sync"):
            metrics.update(self._sync_metrics(self._sync_weights()))
        if cfg.resources.colocate:
            metrics["colocate/handoff"] = self.pool.take_handoff_events()
            metrics["colocate/vllm_sleep_calls"] = float(self.pool.stats.vllm_sleep_calls)
        metrics.update(timer.breakdown())
        return metrics

    def _rl_step_async(self, step: int) -> dict:
        """The asynchronous step (max_staleness k >= 1): train on batch `step`, generated earlier by the producer
        thread, while it generates batch step + k; update the weights once that batch is done (async_rollouts.py)."""
        timer = StepTimer()
        with timer("wait_rollouts"):
            rollouts = self._producer.take(step)
        metrics = self._report(rollouts)
        if rollouts.groups:
            with timer("train"):
                metrics.update(self._train(rollouts))
        with timer("wait_rollouts"):  # batch step + k must be generated with the weights it was scheduled for
            self._producer.wait_generated(step + self.cfg.algorithm.max_staleness)
        if rollouts.groups:
            with timer("sync"):
                metrics.update(self._sync_metrics(self._sync_weights()))
        metrics.update(timer.breakdown())
        # generation and scoring ran in the producer thread, overlapping the parts above
        metrics.update({f"time/{name}": seconds for name, seconds in rollouts.seconds.items()})
        return metrics

    def _report(self, rollouts: Rollouts) -> dict:
        for message in rollouts.messages:
            self.echo(f"[step {rollouts.step}] {message}")
        return dict(rollouts.metrics)

    def _train(self, rollouts: Rollouts) -> dict:
        """Advantages, the actor batch, old (and reference) log-probs, the optimizer step(s): train/*, mismatch/*,
        async/* metrics. The engines' weights are not touched here."""
        cfg, algo = self.cfg, self.cfg.algorithm
        metrics = self._staleness(rollouts)
        batch = build_actor_batch(rollouts.groups, algo.advantage, algo.overlong)
        metrics["train/advantage_abs_mean"] = float(batch.advantages.abs().mean())
        if cfg.logging.save_rollouts:
            save_step_rollouts(os.path.join(self.run_dir, ROLLOUTS_DIR), rollouts, batch, self.weights_version)
        self.pool.yield_to_training()  # colocated: the engines sleep until _sync_weights
        metrics.update(self._update(batch))
        return metrics

    def _update(self, batch) -> dict:
        """The policy update on the actor batch (training/update.py; replay-step runs the same function)."""
        return policy_update(self.group, batch, self.cfg)

    def _staleness(self, rollouts: Rollouts) -> dict:
        """async/staleness_mean / _max: weight versions between each trained sample's generator and the policy being
        updated now; more than algorithm.max_staleness would break the schedule's bound (docs/design.md, contract 4)."""
        staleness = [self.weights_version - v for v in rollouts.weights_versions()]
        bound = self.cfg.algorithm.max_staleness
        if min(staleness) < 0 or max(staleness) > bound:
            raise RuntimeError(f"step {rollouts.step}: rollouts {min(staleness)}..{max(staleness)} weight versions old "
                               f"(current version {self.weights_version}), outside [0, algorithm.max_staleness={bound}]")
        return {"async/staleness_mean": sum(staleness) / len(staleness), "async/staleness_max": float(max(staleness))}

    @staticmethod
    def _sync_metrics(stats) -> dict:
        return {"sync/seconds": float(getattr(stats, "seconds", float("nan"))),
                "sync/bytes": float(getattr(stats, "num_bytes", float("nan")))}

    # ------------------------------------------------------------------------------------ eval, warm-up
    def _eval_enabled(self) -> bool:
        return self.val_data is not None and len(self.val_data) > 0

    def _evaluate(self) -> dict:
        from megatron_rl.training.evaluation import evaluate
        from megatron_rl.rollout.types import SamplingConfig

        cfg = self.cfg.eval
        examples = self.val_data.examples[: cfg.num_prompts] if cfg.num_prompts else self.val_data.examples
        sampling = SamplingConfig(n=cfg.n, temperature=cfg.temperature, top_p=cfg.top_p,
                                  max_tokens=cfg.max_tokens or self.cfg.sampling.max_tokens, seed=self.cfg.run.seed)
        start = time.perf_counter()
        result = evaluate(lambda ids, s: generate_grouped(self.pool, ids, s), examples, self.reward_pool, sampling,
                          pass_ks=cfg.pass_ks)
        metrics = dict(result.metrics)
        metrics["eval/accuracy"] = metrics.get(f"eval/avg@{cfg.n}", float("nan"))
        metrics["time/eval"] = time.perf_counter() - start
        self.echo(f"[eval] step {self.step}: accuracy {metrics['eval/accuracy']:.3f} on {len(examples)} prompts "
                  f"(mean response length {metrics.get('eval/mean_response_length', float('nan')):.1f})")
        return metrics

    def _warmup(self) -> bool:
        """Supervised warm-up on the synthetic task's reference answers; returns whether it ran (the engines then
        need a weight sync). With a KL term the reference becomes the warmed-up policy, so the KL anchors RL at the
        model RL starts from."""
        from megatron_rl.actor.batch import ActorBatch
        from megatron_rl.data import render_sft_example
        from megatron_rl.data.synthetic.export import sft_pairs

        cfg = self.cfg.warmup
        if cfg.steps == 0:
            return False
        syn = self.cfg.data.synthetic
        pairs = sft_pairs(syn.task, cfg.steps * cfg.batch_size, seed=cfg.seed, difficulty=syn.difficulty)
        self.echo(f"[warmup] {cfg.steps} supervised steps of {cfg.batch_size} examples (lr {cfg.lr})")
        threads = self._threads_beside_starting_engines()
        if threads is not None:
            self.group.set_threads(threads)
        try:
            for k in range(cfg.steps):
                rendered = [render_sft_example(self.tokenizer, p.messages, p.response)
                            for p in pairs[k * cfg.batch_size : (k + 1) * cfg.batch_size]]
                batch = ActorBatch(prompt_ids=[r[0] for r in rendered], response_ids=[r[1] for r in rendered])
                m = self.group.train_step(batch, objective="sft", lr=cfg.lr)
                if (k + 1) % max(1, cfg.steps // 5) == 0 or k + 1 == cfg.steps:
                    self.echo(f"[warmup] step {k + 1}/{cfg.steps}: nll {m['nll']:.3f}")
        finally:
            if threads is not None:
                self.group.set_threads(self.group.threads_per_rank)
        self.group.reset_optimizer_state()
        if self.cfg.actor.loss.kl_coef > 0:
            self.group.reset_reference_to_policy()
            self.echo("[warmup] KL reference set to the warmed-up policy")
        return True

    def _threads_beside_starting_engines(self) -> int | None:
        """Fewer torch threads per rank for the warm-up when it shares a local machine's CPUs with engines that are
        still starting (split pool, CPU device: placement.threads_beside_starting_engines); None: no change."""
        from megatron_rl.cluster.placement import threads_beside_starting_engines

        cpus = self._local_cpus
        if cpus is None or self.cfg.resources.colocate or self.cfg.resources.resolved_device != "cpu":
            return None
        threads = threads_beside_starting_engines(self.group.threads_per_rank, self.cfg.resources.actor_ranks,
                                                  self.cfg.rollout.num_engines, cpus)
        return threads if threads != self.group.threads_per_rank else None

    def _sync_weights(self):
        """Stream the actor's weights to every engine as the next weights version (after each RL step, and before
        the first one when the actor's weights are not model.path's: `_prepare_policy`); returns the pool's stats.
        Colocated engines asleep since the rollout get their memory back around it (`RolloutPool.sync_weights`)."""
        stats = self.pool.sync_weights(self._weights(), version=self.weights_version + 1)
        self.weights_version += 1
        return stats

    def _weights(self):
        """What the pool loads the actor's weights from (rollout.weight_sender): the owner ranks, which send their own
        shares to the engines, or rank 0's stream of buckets, which the pool's transport sends."""
        config = self.pool.config
        return self.group.weights(config.resolved_weight_sender, int(config.weight_bucket_mb * 1024**2),
                                  timeout_s=config.weight_sync_timeout_s, transport=config.transport)

    # ----------------------------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        start = time.perf_counter()
        state = {"sampler": self.sampler.state_dict(), "weights_version": self.weights_version,
                 "run_name": self.cfg.run.name, "max_staleness": self.cfg.algorithm.max_staleness}
        pending = self._producer.pending() if self._producer is not None else {}
        extra_files = {RUN_CONFIG: config_yaml(self.cfg)}
        if pending:
            extra_files[PENDING_ROLLOUTS] = json.dumps([r.to_json() for _, r in sorted(pending.items())])
            routing = {key: t for r in pending.values() for key, t in r.routing_tensors().items()}
            if routing:  # MoE routing replay: the routed experts, as tensors (loaded with weights_only=True)
                buffer = io.BytesIO()
                torch.save(routing, buffer)
                extra_files[PENDING_ROUTING] = buffer.getvalue()
        path = save_training_checkpoint(self.ckpt_root, self.step, self.group, state,
                                        metrics_path=self.metrics.path if self.metrics else None,
                                        keep_last=self.cfg.checkpoint.keep_last, extra_files=extra_files)
        self._last_saved_step = self.step
        self.echo(f"[checkpoint] step {self.step} saved to {path} ({time.perf_counter() - start:.1f}s)")

    def _check_resumable(self, path: str) -> None:
        """Refuse, before anything starts, a resume whose settings would change what the checkpoint's run computes
        (config.changed_math: everything but RESUME_SAFE_KEYS), listing the differing keys."""
        import yaml

        from megatron_rl.checkpoint.names import RUN_CONFIG
        from megatron_rl.config import changed_math
        from megatron_rl.config_loader import ConfigError, to_dict

        saved_path = os.path.join(path, RUN_CONFIG)
        if not os.path.exists(saved_path):  # written before checkpoints carried their config
            self.echo(f"[resume] {path} holds no {RUN_CONFIG}: the settings cannot be compared with the run's")
            return
        with open(saved_path, encoding="utf-8") as f:
            saved = yaml.safe_load(f)
        changes = changed_math(saved, to_dict(self.cfg))
        if not changes:
            return
        listing = "\n  ".join(changes)
        if self.allow_config_change:
            self.echo(f"[resume] continuing with changed settings (--allow-config-change):\n  {listing}")
            return
        raise ConfigError(
            f"--resume: settings that change what the run computes differ from its checkpoint {path}:\n  {listing}\n"
            "Resume with the checkpoint's values, or pass --allow-config-change to continue with the new ones"
        )

    def _resume(self, step: int, path: str) -> None:
        state = load_trainer_state(path)
        self.group.load_checkpoint(path, state["actor"])
        self.sampler.load_state_dict(state["sampler"])
        self.step = step
        self._last_saved_step = step
        self.weights_version = int(state.get("weights_version", 0))
        pending_file = os.path.join(path, PENDING_ROLLOUTS)
        if os.path.exists(pending_file):
            with open(pending_file, encoding="utf-8") as f:
                saved = json.load(f)
            by_row = {example.row: example for example in self.train_data.examples}
            routing_file = os.path.join(path, PENDING_ROUTING)
            routing = torch.load(routing_file, weights_only=True) if os.path.exists(routing_file) else None
            self._restored_rollouts = {int(r["step"]): Rollouts.from_json(r, by_row, routing) for r in saved}
        self.echo(f"[resume] continuing from step {step} ({path})"
                  + (f" with {len(self._restored_rollouts)} generated, not yet trained batch(es)"
                     if self._restored_rollouts else ""))

    # ---------------------------------------------------------------------------------- shutdown, signals
    def _install_signal_handlers(self):
        def request_stop(signum, frame):
            if self._stop_requested:  # a second signal: stop now
                raise KeyboardInterrupt
            self._stop_requested = True
            self.echo(f"[stop] {signal.Signals(signum).name}: finishing the current step, then saving")

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                previous[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
        return previous

    @staticmethod
    def _restore_signal_handlers(previous) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def shutdown(self) -> None:
        """Stop everything this trainer started: engines, Megatron ranks (at once after a failure), reward workers,
        the private Ray cluster. Nothing is left running (docs/training.md, "Failures")."""
        import ray

        if self._producer is not None:
            self._producer.stop(timeout=0)
        for name in ("pool", "group"):
            obj = getattr(self, name)
            if obj is not None:
                try:
                    obj.shutdown(graceful=False) if name == "group" and self._failed else obj.shutdown()
                except Exception as e:  # noqa: BLE001 - shut the rest down regardless
                    logger.warning("shutting down %s failed: %s", name, e)
                setattr(self, name, None)
        if self.reward_pool is not None:
            self.reward_pool.close()
            self.reward_pool = None
        if self.metrics is not None:
            self.metrics.close()
        if getattr(self, "_owns_ray", False) and ray.is_initialized():
            ray.shutdown()


__all__ = ["Trainer"]
