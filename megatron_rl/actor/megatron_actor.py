"""The Megatron training actor: one instance per rank of a TP x PP x CP x EP x DP world.

Usable directly under torchrun / `spawn_ranks` and as a Ray actor (megatron_rl/actor/ray_group.py wraps it):
every rank receives the same `ActorBatch` and calls the same method; results that live on one rank (gathered
log-probs) come back on global rank 0, reduced metrics come back on every rank.

    actor = MegatronActor(ActorConfig(model_path=..., layout=ParallelLayout(tp=2)))
    actor.setup()                                   # process groups, model, weights, DDP, optimizer
    logps = actor.compute_log_probs(batch)          # forward only, through the pipeline schedule
    metrics = actor.train_step(batch)               # one optimizer step over the global batch
    for bucket in actor.export_hf_weights():        # full HF-named tensors for weight sync
        ...

Loss scaling follows the contract in megatron_rl/algorithms/normalization.py: the policy loss returns each
micro-batch's additive share of the global loss; Megatron is configured to sum (not average) gradients over
DP x CP and not to divide by the number of micro-batches (`calculate_per_token_loss=True`, and a
`finalize_model_grads_func` that does not rescale by token counts).
"""
from __future__ import annotations

import time
from functools import partial

import torch
import torch.distributed as dist

from megatron_rl.actor.batch import ActorBatch, MicroBatch, TensorList, build_microbatch, plan_microbatches
from megatron_rl.actor.config import ActorConfig
from megatron_rl.actor.logprobs import token_entropy, token_log_probs
from megatron_rl.algorithms import GlobalBatchCounts, LossMetrics, policy_loss_share, sft_loss_share
from megatron_rl.faults import inject
from megatron_rl.models.qwen_arch import load_arch
from megatron_rl.parallel.schedule import run_schedule


def _comm_device() -> torch.device:
    """Where tensors for collectives must live: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _finalize_grads_without_token_scaling(model, num_tokens=None, pg_collection=None, force_all_reduce=False):
    """Megatron's grad finalisation (DP/CP all-reduce, SP norm grads, tied embeddings) without the division by
    the step's token count: our loss shares already carry their global normaliser."""
    from megatron.core.distributed import finalize_model_grads

    return finalize_model_grads(model, num_tokens=None, pg_collection=pg_collection, force_all_reduce=force_all_reduce)


class MegatronActor:
    def __init__(self, config: ActorConfig):
        if not config.model_path:
            raise ValueError("actor.model_path is empty: give the HF model folder to train")
        self.config = config
        self.arch = load_arch(config.model_path)  # bad configs fail here, before any process group exists
        self.model: list = []
        self.optimizer = None
        self.scheduler = None
        self.steps_done = 0
        self.weights_revision = 0  # +1 whenever the policy's weights change (a step, a checkpoint load)
        self.reference = None
        self.reference_is_reset = False  # True once the reference is a copy of a trained policy (saved with it)

    # ------------------------------------------------------------------------------------------------ set-up
    def setup(self) -> "MegatronActor":
        """Create process groups, build the model and load its starting weights (the HF folder model_path, or
        megatron_checkpoint when set: actor/initial_weights.py), wrap it in DDP, build the optimizer.

        Collective: every rank of the (already initialised) torch.distributed world calls it.
        """
        from megatron.core import parallel_state as ps
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
        from megatron.core import rerun_state_machine

        from megatron_rl.actor.initial_weights import InitialWeights
        from megatron_rl.models.builder import build_model_chunks, transformer_config
        from megatron_rl.parallel.state import initialize_parallel

        cfg, arch = self.config, self.arch
        initial_weights = InitialWeights(cfg, arch)  # a bad source fails here, before any process group exists
        cfg.layout.validate(dist.get_world_size(), arch)
        self.dp_size = initialize_parallel(cfg.layout, seed=cfg.seed)
        if rerun_state_machine._GLOBAL_RERUN_STATE_MACHINE is None:  # the optimizer asks for it; explicit = no warning
            rerun_state_machine.initialize_rerun_state_machine(mode=rerun_state_machine.RerunMode.DISABLED)
        replaying = cfg.moe.routing_replay != "none"
        if replaying and arch.moe is None:
            raise ValueError(f"actor.moe.routing_replay={cfg.moe.routing_replay!r} needs a MoE model; "
                             f"{arch.model_type} has no experts")
        self.transformer_config = transformer_config(
            arch, cfg.layout, dtype=cfg.dtype, moe_aux_loss_coeff=cfg.moe_aux_loss_coeff, recompute=cfg.recompute,
            calculate_per_token_loss=True, **({"moe_enable_routing_replay": True} if replaying else {}),
        )
        chunks = build_model_chunks(arch, self.transformer_config)
        initial_weights.load(chunks)
        if self.transformer_config.bf16:
            from megatron.core.transformer.module import Float16Module

            # as Megatron-LM does: every parameter in bf16 (fp32 masters live in the optimizer), fp32 logits out
            chunks = [Float16Module(self.transformer_config, chunk) for chunk in chunks]
        opt = cfg.optimizer
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=opt.distributed_optimizer,
            check_for_nan_in_grad=True,
        )
        self.model = [
            DistributedDataParallel(config=self.transformer_config, ddp_config=ddp_config, module=chunk) for chunk in chunks
        ]
        self.transformer_config.finalize_model_grads_func = _finalize_grads_without_token_scaling
        if cfg.loss.kl_coef > 0:  # a frozen copy of the initial policy for the KL term
            self.reference = build_model_chunks(arch, self.transformer_config)
            initial_weights.load(self.reference)
            for chunk in self.reference:
                chunk.requires_grad_(False)
        self._replay = {}  # "policy" / "reference" -> RoutingReplay (actor/routing_replay.py)
        if replaying:
            from megatron_rl.actor.routing_replay import RoutingReplay

            moe_layers = arch.moe.routed_layers
            self._replay["policy"] = RoutingReplay(self.model, moe_layers, arch.moe.top_k, arch.moe.num_experts)
            if self.reference is not None and cfg.moe.routing_replay == "rollout":  # R2 leaves the reference alone
                self._replay["reference"] = RoutingReplay(self.reference, moe_layers, arch.moe.top_k,
                                                          arch.moe.num_experts)
        initial_weights.close()
        self.optimizer = get_megatron_optimizer(
            OptimizerConfig(
                optimizer=opt.name, sgd_momentum=0.0, lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
                adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps, clip_grad=opt.clip_grad,
                bf16=cfg.dtype == "bfloat16", params_dtype=self.transformer_config.params_dtype,
                use_distributed_optimizer=opt.distributed_optimizer,
            ),
            self.model,
        )
        decay_steps = opt.decay_steps or 10**9
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0 if opt.warmup_steps else opt.lr, max_lr=opt.lr, min_lr=opt.min_lr,
            lr_warmup_steps=opt.warmup_steps, lr_decay_steps=max(decay_steps, opt.warmup_steps + 1),
            lr_decay_style=opt.decay_style, start_wd=opt.weight_decay, end_wd=opt.weight_decay,
            wd_incr_steps=1, wd_incr_style="constant",
        )
        self._groups = {
            "dp": ps.get_data_parallel_group(), "cp": ps.get_context_parallel_group(),
            "pp": ps.get_pipeline_model_parallel_group(), "tp": ps.get_tensor_model_parallel_group(),
        }
        return self

    # ------------------------------------------------------------------------------------------ micro-batches
    def _my_microbatches(self, batch: ActorBatch) -> list[MicroBatch]:
        from megatron.core import parallel_state as ps

        if len(batch) == 0:
            raise ValueError("the batch has no sequences")
        layout = self.config.layout
        multiple = layout.pp if len(self.model) > 1 else 1  # the interleaved schedule needs M % pp == 0
        plan = plan_microbatches(
            batch.sequence_lengths, self.dp_size, self.config.max_tokens_per_microbatch, multiple_of=multiple
        )
        mine = plan[ps.get_data_parallel_rank()]
        return [
            build_microbatch(batch, ids, packing=self.config.packing, tp=layout.tp, cp=layout.cp,
                             cp_rank=ps.get_context_parallel_rank())
            for ids in mine
        ]

    def _forward(self, mb: MicroBatch, model):
        tokens, positions = mb.tokens, mb.positions
        if torch.cuda.is_available():
            tokens, positions = tokens.cuda(non_blocking=True), positions.cuda(non_blocking=True)
        return model(tokens, positions, attention_mask=None, packed_seq_params=mb.packed_seq_params)

    def _selected_logits(self, mb: MicroBatch, output: torch.Tensor):
        logits = output.reshape(-1, output.shape[-1])
        index = mb.label_index.to(logits.device)
        return logits.index_select(0, index), mb.labels.reshape(-1).to(logits.device).index_select(0, index)

    @staticmethod
    def _dense(mb: MicroBatch, values: torch.Tensor) -> torch.Tensor:
        """[n] values at (rows, cols) -> [B, R] (differentiable w.r.t. values; zeros elsewhere)."""
        out = values.new_zeros(mb.mask.shape)
        return out.index_put((mb.rows.to(values.device), mb.cols.to(values.device)), values)

    # ------------------------------------------------------------------------------------ forward-only pass
    @torch.no_grad()
    def compute_log_probs(self, batch: ActorBatch, *, with_entropy: bool = False, model: str = "policy",
                          record_routing: bool = False):
        """Per-sequence response log-probs (and entropies) under the current weights (model="policy") or the
        frozen KL reference (model="reference", built when loss.kl_coef > 0: the initial weights, or the policy's
        at the last reset_reference_to_policy).

        Returns on global rank 0 a list with one [len(response_i)] tensor per sequence (a tuple
        (log_probs, entropies) per sequence when with_entropy), None on other ranks. Collective.
        record_routing (actor.moe.routing_replay=old_policy, the old-policy pass): returns (that list, the experts
        every token was routed to, one [prompt + response - 1, MoE layers, top-k] tensor per sequence) instead,
        for the training passes to replay (docs/actor.md, "Routing replay").
        """
        inject("actor.compute_log_probs", rank=dist.get_rank())
        if model not in ("policy", "reference"):
            raise ValueError(f"model must be 'policy' or 'reference', got {model!r}")
        if model == "reference" and self.reference is None:
            raise ValueError("no reference model: it is built only when actor.loss.kl_coef > 0")
        chunks = self.model if model == "policy" else self.reference

        if record_routing and (self.config.moe.routing_replay != "old_policy" or model != "policy"):
            raise ValueError("record_routing is the old-policy pass of actor.moe.routing_replay=old_policy (got "
                             f"routing_replay={self.config.moe.routing_replay!r}, model={model!r})")
        microbatches = self._my_microbatches(batch)
        temperature = self.config.temperature

        replay = self._replay_for(batch, model, training=False)
        recorder = self._replay["policy"] if record_routing else None
        if recorder is not None:
            tables = recorder.new_tables(batch)
            recorder.start_recording()

        def forward_step(mb, model):
            if replay is not None:
                self._set_replay(replay, model, mb, batch, training=False)
            output = self._forward(mb, model)
            if recorder is not None:
                recorder.collect(model, mb, tables, **self._token_split())

            def collect(out, non_loss_data=False):
                logits, labels = self._selected_logits(mb, out)
                ids, cols, logp, _ = self._response_pieces(mb, token_log_probs(logits, labels, temperature))
                ent = token_entropy(logits, temperature).cpu() if with_entropy else None
                return ids, cols, logp, ent

            return output, collect

        for chunk in chunks:
            chunk.eval()
        try:
            outputs = run_schedule(
                chunks, microbatches, forward_step, seq_length=max(mb.tokens.shape[-1] for mb in microbatches),
                micro_batch_size=max(mb.tokens.shape[0] for mb in microbatches), forward_only=True,
                collect_outputs=True,
            )
        finally:
            for used in (replay, recorder):
                if used is not None:
                    used.clear()
                    used.take_agreement()  # the training forward's agreement is the one reported
        routing = recorder.assemble(tables) if recorder is not None else None
        gathered = self._gather_on_rank0(batch, outputs, with_entropy)
        if gathered is None:
            return None
        logps, ents = gathered
        out = list(zip(logps, ents)) if with_entropy else logps
        return (out, TensorList(routing)) if record_routing else out

    @staticmethod
    def _gather_on_rank0(batch: ActorBatch, pieces: list, with_entropy: bool = False):
        """Per-sequence response values from the micro-batches' (sample ids, columns, log-probs, entropies) pieces
        of every rank that holds logits (last pipeline stage, TP rank 0): ([logp_i], [entropy_i] or None) on global
        rank 0, None elsewhere. Collective (one gather_object)."""
        from megatron.core import parallel_state as ps

        holds = ps.is_pipeline_last_stage(ignore_virtual=True) and ps.get_tensor_model_parallel_rank() == 0
        gathered = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(pieces if holds else [], gathered, dst=0)
        if dist.get_rank() != 0:
            return None
        # one flat response-token array for the whole batch (sequence i at starts[i]), filled by indexing
        lengths = torch.tensor([len(r) for r in batch.response_ids], dtype=torch.long)
        starts = lengths.cumsum(0) - lengths
        logps = torch.full((int(lengths.sum()),), float("nan"))
        ents = torch.full_like(logps, float("nan")) if with_entropy else None
        for rank_pieces in gathered:
            for ids, cols, logp, ent in rank_pieces:
                at = starts[ids] + cols
                logps[at] = logp
                if with_entropy:
                    ents[at] = ent
        missing = torch.repeat_interleave(torch.arange(len(lengths)), lengths)[torch.isnan(logps)].unique().tolist()
        if missing:
            raise RuntimeError(f"log-probs missing for sequences {missing[:5]}: the micro-batch plan lost tokens")
        split = lengths.tolist()
        return TensorList(torch.split(logps, split)), list(torch.split(ents, split)) if with_entropy else None

    @staticmethod
    def _response_pieces(mb: MicroBatch, logp: torch.Tensor):
        """(sample ids, columns, log-probs, None) of a micro-batch's response tokens held here (for the gather)."""
        ids = torch.tensor(mb.sample_ids, dtype=torch.long)[mb.rows] if mb.rows.numel() else mb.rows
        return ids, mb.cols, logp.detach().cpu(), None

    # ----------------------------------------------------------------------------------------- train step
    def train_step(self, batch: ActorBatch, *, objective: str = "policy", max_response_length: int | None = None,
                   lr: float | None = None, old_from_forward: bool = False) -> dict[str, float]:
        """One optimizer step over the whole batch. Collective.

        objective "policy": the configured policy loss; batch needs old_log_probs and advantages (or
        token_advantages). objective "sft": negative log-likelihood of the responses (supervised warm-up).
        old_from_forward: the old policy IS the current one (the first and only optimizer step on fresh rollouts),
        so the old log-probs are this forward's own, detached: the ratio is exactly 1 and the separate forward pass
        of compute_log_probs is saved. batch.old_log_probs must then be None; rank 0's result carries the
        per-sequence log-probs under "log_probs" (for the train/rollout mismatch metric), gathered like
        compute_log_probs'.
        max_response_length: Dr.GRPO's constant (the generation limit); default the loss settings' value, else
        the longest response in the batch. lr: use this learning rate for this step (e.g. the warm-up's).
        Returns metrics identical on every rank: loss (the full-batch loss), grad_norm, lr, the loss metrics
        (clip fractions, ratios, KL, entropy), token counts and timings.
        """
        from megatron.core import parallel_state as ps

        inject("actor.train_step", rank=dist.get_rank())
        cfg = self.config
        if old_from_forward and (objective != "policy" or batch.old_log_probs is not None):
            raise ValueError("old_from_forward takes the old log-probs from this step's forward: objective must be "
                             "'policy' and batch.old_log_probs None")
        if objective == "policy":
            if not old_from_forward:
                batch.require("old_log_probs")
            if batch.advantages is None and batch.token_advantages is None:
                raise ValueError("train_step needs batch.advantages (per sequence) or batch.token_advantages")
        elif objective != "sft":
            raise ValueError(f"objective must be 'policy' or 'sft', got {objective!r}")
        start = time.perf_counter()
        microbatches = self._my_microbatches(batch)
        limit = max_response_length or cfg.loss.max_response_length or max(batch.max_response_length, 1)
        counts = GlobalBatchCounts.from_masks(
            [mb.mask.to(_comm_device()) for mb in microbatches], dp_group=self._groups["dp"], cp_group=self._groups["cp"],
            max_response_length=limit, **(cfg.loss.count_options() if objective == "policy" else {}),
        )
        cp_group = self._groups["cp"] if cfg.layout.cp > 1 else None
        present = {name for name in ("ref_log_probs", "rollout_log_probs") if getattr(batch, name) is not None}
        loss_fn = partial(self._policy_objective, present=present, old_from_forward=old_from_forward) \
            if objective == "policy" else self._sft_objective

        replay = self._replay_for(batch, "policy", training=True) if objective == "policy" else None

        def forward_step(mb, model):
            if replay is not None:
                self._set_replay(replay, model, mb, batch, training=True)
            output = self._forward(mb, model)
            return output, partial(self._loss, mb, counts, cp_group, loss_fn, keep_log_probs=old_from_forward)

        for chunk in self.model:
            chunk.train()
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        saved_lr = self._set_lr(lr)
        fwd_bwd_start = time.perf_counter()
        try:
            outputs = run_schedule(
                self.model, microbatches, forward_step, seq_length=max(mb.tokens.shape[-1] for mb in microbatches),
                micro_batch_size=max(mb.tokens.shape[0] for mb in microbatches), forward_only=False,
            )
        finally:
            if replay is not None:
                replay.clear()
        fwd_bwd_seconds = time.perf_counter() - fwd_bwd_start
        update_ok, grad_norm, _ = self.optimizer.step()
        self.weights_revision += 1
        step_lr = float(self.optimizer.param_groups[0]["lr"])
        if lr is not None:
            self._set_lr(saved_lr)
        elif update_ok:
            self.scheduler.step(increment=1)
        self.steps_done += 1

        # Loss and metrics live on the last pipeline stage: reduce over DP x CP there, then share over PP.
        inject("actor.collective", rank=dist.get_rank())
        summary = None
        if ps.is_pipeline_last_stage(ignore_virtual=True):
            loss = sum(float(o["share"]) for o in outputs)
            metrics = LossMetrics()
            for o in outputs:
                metrics.merge(o["metrics"])
            loss_t = torch.tensor([loss], dtype=torch.float64, device=_comm_device())
            for group in (self._groups["dp"], self._groups["cp"]):
                if dist.get_world_size(group) > 1:
                    dist.all_reduce(loss_t, group=group)
            summary = {"loss": float(loss_t), **metrics.reduce(self._groups["dp"], self._groups["cp"]).means()}
        holder = [summary]
        pp_group = self._groups["pp"]
        if dist.get_world_size(pp_group) > 1:
            last = dist.get_process_group_ranks(pp_group)[-1]
            dist.broadcast_object_list(holder, src=last, group=pp_group)
        forward_log_probs = None
        if old_from_forward:
            pieces = [o["log_probs"] for o in outputs] if ps.is_pipeline_last_stage(ignore_virtual=True) else []
            gathered = self._gather_on_rank0(batch, pieces)
            forward_log_probs = None if gathered is None else gathered[0]
        elapsed = time.perf_counter() - start
        model_tokens = torch.tensor([sum(mb.num_model_tokens for mb in microbatches)], dtype=torch.float64,
                                    device=_comm_device())
        dist.all_reduce(model_tokens)  # every rank's tokens: TP ranks see the same tokens, so divide by TP x PP
        tokens = float(model_tokens) / (cfg.layout.tp * cfg.layout.pp)
        return {
            **holder[0],
            "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
            "lr": step_lr,
            "update_skipped": float(not update_ok),
            "num_sequences": float(counts.num_sequences),
            "num_response_tokens": float(counts.num_tokens),
            "num_microbatches": float(len(microbatches)),
            "model_tokens": tokens,
            "step_seconds": elapsed,
            "fwd_bwd_seconds": fwd_bwd_seconds,
            "tokens_per_second": tokens / elapsed if elapsed > 0 else float("nan"),
            **({"log_probs": forward_log_probs} if forward_log_probs is not None else {}),
            **(self._agreement(replay) if replay is not None else {}),
        }

    def _replay_for(self, batch: ActorBatch, model: str, training: bool):
        """The RoutingReplay that replays `batch.routed_experts` in this pass of `model`, or None.

        rollout (R3): every pass of the policy and the reference; the batch must carry the engines' routing.
        old_policy (R2): the training passes, with the routing the old-policy pass recorded
        (compute_log_probs(record_routing=True)); without it (the old log-probs come from the training forward
        itself, so that forward is the old policy) nothing is replayed."""
        replay = self._replay.get(model)
        if replay is None:
            return None
        if self.config.moe.routing_replay == "old_policy":
            return replay if training and batch.routed_experts is not None else None
        if batch.routed_experts is None:
            raise ValueError(f"actor.moe.routing_replay={self.config.moe.routing_replay!r} but the batch has no "
                             "routed_experts: the engines must return them (rollout.engine.return_routed_experts)")
        return replay

    def _token_split(self) -> dict:
        """How a router's tokens are split over TP ranks (sequence parallelism), for RoutingReplay."""
        from megatron.core import parallel_state as ps

        return {"tp": self.config.layout.tp, "tp_rank": ps.get_tensor_model_parallel_rank(),
                "sequence_parallel": self.transformer_config.sequence_parallel}

    def _set_replay(self, replay, chunk, mb: MicroBatch, batch: ActorBatch, training: bool) -> None:
        replay.set_targets(chunk, mb, batch.routed_experts, **self._token_split(),
                           recomputed_in_backward=training and self.transformer_config.recompute_granularity == "full")

    @staticmethod
    def _agreement(replay) -> dict[str, float]:
        """moe_routing_agreement: the routers' own top-k vs the replayed one, over every rank's (token, layer)."""
        counts = torch.tensor(replay.take_agreement(), dtype=torch.float64, device=_comm_device())
        dist.all_reduce(counts)
        return {"moe_routing_agreement": float(counts[0] / counts[1]) if counts[1] > 0 else float("nan")}

    @torch.no_grad()
    def reset_reference_to_policy(self) -> None:
        """Make the KL reference a frozen copy of the policy's current weights, e.g. after the supervised warm-up, so
        that the KL term anchors RL at the warmed-up model rather than at the one training started from.

        Both are built in the same layout, so every rank copies its own shards, parameter by parameter (through the
        DDP / Float16Module wrappers of the policy; no communication). The reference is a copy, not an alias: later
        updates of the policy leave it unchanged. Training checkpoints save it from now on (checkpoint/names.py, REFERENCE_DIR).
        """
        from megatron_rl.checkpoint.model_ckpt import unwrap_model

        if self.reference is None:
            raise ValueError("no reference model to reset: it is built only when actor.loss.kl_coef > 0")
        for policy_chunk, reference_chunk in zip(self.model, self.reference, strict=True):
            source = dict(unwrap_model(policy_chunk).named_parameters())
            target = dict(unwrap_model(reference_chunk).named_parameters())
            if source.keys() != target.keys():
                raise RuntimeError(
                    "the policy and reference models have different parameters: "
                    f"{sorted(source.keys() ^ target.keys())[:5]}"
                )
            for name, param in target.items():
                param.copy_(source[name])
        self.reference_is_reset = True

    def reset_optimizer_state(self) -> None:
        """Forget Adam's moments and step count (e.g. after the supervised warm-up, before RL)."""
        from megatron_rl.checkpoint.optimizer_ckpt import reset_optimizer_state

        reset_optimizer_state(self.optimizer)

    def _set_lr(self, lr: float | None):
        """Set every param group's lr (None: leave as is); returns the previous value."""
        previous = self.optimizer.param_groups[0]["lr"]
        if lr is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        return previous

    def _loss(self, mb: MicroBatch, counts, cp_group, objective, output, *, keep_log_probs: bool = False):
        """Megatron's loss_func for one micro-batch: (share, local token count, {share, metrics}); with
        keep_log_probs also this micro-batch's detached response log-probs ("log_probs": gather pieces)."""
        if mb.num_rows == 0:
            # A dummy micro-batch (this DP rank has fewer sequences than micro-batches): one fully masked row
            # keeps the collectives inside the loss and the metric names identical on every rank.
            zero = output.sum() * 0.0
            row = zero.reshape(1, 1)
            fields = {name: row.detach() for name in ("old_log_probs", "ref_log_probs", "rollout_log_probs")}
            no_tokens = torch.zeros(1, 1, dtype=torch.bool, device=row.device)
            share, metrics = objective(row, row, fields, zero.detach().reshape(1), no_tokens, counts, cp_group)
            out = {"share": share.detach(), "metrics": metrics}
            if keep_log_probs:
                out["log_probs"] = (mb.rows, mb.cols, torch.zeros(0), None)
            return share + zero, torch.zeros((), dtype=torch.int), out
        temperature = self.config.temperature
        logits, labels = self._selected_logits(mb, output)
        token_logp = token_log_probs(logits, labels, temperature)
        logp = self._dense(mb, token_logp)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.config.loss.entropy_coef != 0):
            entropy = self._dense(mb, token_entropy(logits, temperature))
        device = logp.device
        fields = {k: v.to(device) for k, v in mb.fields.items()}
        advantages = fields.get("token_advantages") if mb.advantages is None else mb.advantages.to(device)
        share, metrics = objective(logp, entropy, fields, advantages, mb.mask.to(device), counts, cp_group)
        out = {"share": share.detach(), "metrics": metrics}
        if keep_log_probs:
            out["log_probs"] = self._response_pieces(mb, token_logp)
        return share, mb.mask.sum().to(torch.int), out

    def _policy_objective(self, logp, entropy, fields, advantages, mask, counts, cp_group, *, present,
                          old_from_forward=False):
        loss_cfg = self.config.loss
        old = logp.detach() if old_from_forward else fields["old_log_probs"]
        return policy_loss_share(
            loss_cfg.name, logp, old, advantages, mask, counts=counts, cp_group=cp_group,
            entropy=entropy, **{name: fields[name] for name in present}, **loss_cfg.options(),
        )

    @staticmethod
    def _sft_objective(logp, entropy, fields, advantages, mask, counts, cp_group):
        share, metrics = sft_loss_share(logp, mask, counts=counts)
        metrics.add("entropy", (entropy.detach() * mask).sum(), mask.sum())
        return share, metrics

    # ------------------------------------------------------------------------------------------- weights
    def export_hf_weights(self, *, bucket_bytes: int = 256 * 1024**2, dst: int | None = 0, host_copies: bool = True):
        """Buckets of full HF-named tensors (collective; see models/weight_transfer.export_hf_weights)."""
        from megatron_rl.models.weight_transfer import export_hf_weights

        inject("actor.export_weights", rank=dist.get_rank())

        from megatron_rl.checkpoint.model_ckpt import unwrap_model

        return export_hf_weights([unwrap_model(m) for m in self.model], self.arch, bucket_bytes=bucket_bytes, dst=dst,
                                 host_copies=host_copies)

    def weight_source(self, *, bucket_bytes: int = 256 * 1024**2):
        """This rank's owned share of the weights as a vLLM `WeightSource` (collective to build; cached per bucket
        size: the plan depends only on the model and layout; see actor/weight_source.py)."""
        from megatron_rl.actor.weight_source import MegatronWeightSource
        from megatron_rl.checkpoint.model_ckpt import unwrap_model

        cached = getattr(self, "_weight_source", None)
        if cached is None or cached.bucket_bytes != bucket_bytes:
            cached = self._weight_source = MegatronWeightSource([unwrap_model(m) for m in self.model], self.arch,
                                                                bucket_bytes=bucket_bytes)
        return cached

    def owned_weight_buckets(self, *, bucket_bytes: int = 256 * 1024**2):
        """Collective: this rank's own buckets of HF-named tensors ([] where another rank owns the bucket)."""
        source = self.weight_source(bucket_bytes=bucket_bytes)
        inject("actor.export_weights", rank=dist.get_rank())
        return source.buckets()

    # --------------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, ckpt_dir: str) -> dict:
        """Collective: write the model (megatron_rl/checkpoint format), the optimizer state and, once it was reset to
        a trained policy, the KL reference into an existing step directory (the caller makes it atomic; every name is
        in checkpoint/names.py). Returns the small state (LR scheduler, step counter, what was saved) for the trainer's
        state file. Before a reset the reference is the model the actor starts from, which setup() loads again."""
        import os

        from megatron_rl.checkpoint.model_ckpt import write_model_checkpoint
        from megatron_rl.checkpoint.names import REFERENCE_DIR
        from megatron_rl.checkpoint.optimizer_ckpt import save_optimizer_state

        write_model_checkpoint(self.model, self.arch, self.config.layout, ckpt_dir, hf_source_dir=self.config.model_path)
        if self.reference_is_reset:
            write_model_checkpoint(self.reference, self.arch, self.config.layout, os.path.join(ckpt_dir, REFERENCE_DIR),
                                   hf_source_dir=self.config.model_path)
        has_state = save_optimizer_state(self.optimizer, self.model, ckpt_dir, _comm_device())
        return {"scheduler": self.scheduler.state_dict(), "steps_done": self.steps_done, "optimizer_state": has_state,
                "reference_saved": self.reference_is_reset}

    def load_checkpoint(self, ckpt_dir: str, state: dict | None = None, *, load_optimizer: bool = True) -> None:
        """Collective: restore weights (any saved layout), the KL reference when the checkpoint holds one (see
        save_checkpoint; ignored when this actor has no reference, i.e. loss.kl_coef is now 0) and, when asked,
        optimizer and scheduler state."""
        import os

        from megatron_rl.checkpoint.model_ckpt import load_model_checkpoint
        from megatron_rl.checkpoint.names import REFERENCE_DIR
        from megatron_rl.checkpoint.optimizer_ckpt import load_optimizer_state

        load_model_checkpoint(self.model, ckpt_dir)
        self.weights_revision += 1
        if state is not None and state.get("reference_saved") and self.reference is not None:
            load_model_checkpoint(self.reference, os.path.join(ckpt_dir, REFERENCE_DIR))
            self.reference_is_reset = True
        if state is not None and not state.get("optimizer_state", True):
            self.reset_optimizer_state()  # saved before any step: nothing to restore
        elif load_optimizer:
            load_optimizer_state(self.optimizer, self.model, ckpt_dir)
        if state:
            self.scheduler.load_state_dict(state["scheduler"])
            self.steps_done = int(state["steps_done"])

    def shutdown(self) -> None:
        from megatron_rl.parallel.state import destroy_parallel

        destroy_parallel()
