"""One LUSPO train step of the Megatron actor gives the same loss, grad norm and updated weights in every
parallel layout as in a single process; packed and padded micro-batches agree; log-probs equal transformers'.

Comparisons use plain SGD so that the weight update IS the (lr-scaled) gradient; Adam's first step is
~lr * sign(g) and would hide gradient-scale errors. Tolerance 1e-5 relative (fp32): layouts change only the
order of float sums (TP partial sums, CP attention blocks, DP/CP gradient all-reduces); observed ~1e-7..1e-6.
A wrong normaliser (e.g. averaging instead of summing over DP, dividing by micro-batches) is off by >= 2x.
"""
import pytest
import torch

from megatron_rl.actor.batch import ActorBatch
from megatron_rl.actor.config import ActorConfig, OptimizerSettings, PolicyLossSettings
from megatron_rl.actor.megatron_actor import MegatronActor
from megatron_rl.parallel.layout import ParallelLayout
from megatron_rl.parallel.spawn import spawn_ranks

pytestmark = pytest.mark.distributed
RTOL = 1e-5


def make_batch(n: int = 6, seed: int = 0, vocab: int = 400) -> ActorBatch:
    """Sequences of spread lengths (prompts 3-11, responses 1-24 tokens), one empty-ish response, random advantages."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(3, vocab, (int(torch.randint(1, 25, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses[1] = responses[1][:1]  # a length-1 response
    return ActorBatch(prompt_ids=prompts, response_ids=responses, advantages=torch.randn(n, generator=g))


def perturbed(log_probs, seed: int = 1):
    """Old log-probs near the current ones, so that some sequences fall outside LUSPO's clip range."""
    g = torch.Generator().manual_seed(seed)
    return [lp + 0.01 * (torch.rand(lp.shape, generator=g) - 0.5) for lp in log_probs]


def _train_rank(path, layout, packing, max_tokens, old_log_probs, loss="luspo"):
    cfg = ActorConfig(
        model_path=path, layout=ParallelLayout(**layout), packing=packing, max_tokens_per_microbatch=max_tokens,
        optimizer=OptimizerSettings(name="sgd", lr=0.05, weight_decay=0.0, clip_grad=0.0),
        loss=PolicyLossSettings(name=loss),
    )
    actor = MegatronActor(cfg).setup()
    batch = make_batch()
    log_probs = actor.compute_log_probs(batch)
    holder = [log_probs]
    torch.distributed.broadcast_object_list(holder, src=0)
    batch.old_log_probs = old_log_probs if old_log_probs is not None else perturbed(holder[0])

    def weights():
        out = {}
        for bucket in actor.export_hf_weights(dst=0):
            out.update(bucket)
        return out

    before = weights()
    metrics = actor.train_step(batch)
    after = weights()
    actor.shutdown()
    if torch.distributed.get_rank() != 0:
        return None
    return {"log_probs": log_probs, "old": batch.old_log_probs, "metrics": metrics,
            "delta": {k: after[k] - before[k] for k in after}}


def run(path, layout=None, packing=True, max_tokens=48, old=None, loss="luspo"):
    layout = dict(layout or {})
    world = layout.pop("world", None)
    lay = ParallelLayout(**layout)
    world = world or max(lay.model_parallel_size, lay.etp * lay.ep * lay.pp)
    return spawn_ranks(_train_rank, world, args=(path, layout, packing, max_tokens, old, loss), timeout=600)[0]


def assert_same_step(case, ref):
    for key in ("loss", "grad_norm"):
        a, b = case["metrics"][key], ref["metrics"][key]
        assert abs(a - b) <= RTOL * abs(b), (key, a, b)
    num = sum(float((case["delta"][k] - ref["delta"][k]).pow(2).sum()) for k in ref["delta"])
    den = sum(float(ref["delta"][k].pow(2).sum()) for k in ref["delta"])
    assert den > 0, "the reference step changed no weight"
    assert (num / den) ** 0.5 <= RTOL, ("weight update differs", (num / den) ** 0.5)
    for a, b in zip(case["log_probs"], ref["log_probs"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def dense_ref(tiny_model):
    path = tiny_model("qwen3")
    return path, run(path)


@pytest.fixture(scope="module")
def moe_ref(tiny_model):
    path = tiny_model("qwen3_moe")
    return path, run(path)


def test_reference_step_is_meaningful(dense_ref):
    _, ref = dense_ref
    m = ref["metrics"]
    assert m["num_sequences"] == 6 and m["num_microbatches"] >= 2  # several micro-batches even in the reference
    assert 0 < m["seq_clip_frac_low"] + m["seq_clip_frac_high"] < 1  # some sequences clipped, some not
    assert m["grad_norm"] > 0


@pytest.mark.parametrize(
    "layout, packing",
    [({"tp": 2}, True), ({"pp": 2}, True), ({"cp": 2}, True), ({"world": 2}, True), ({}, False), ({"cp": 2}, False)],
    ids=["tp2", "pp2", "cp2", "dp2", "padded", "padded-cp2"],
)
def test_dense_layouts_match_single_process(dense_ref, layout, packing):
    path, ref = dense_ref
    assert_same_step(run(path, dict(layout), packing, old=ref["old"]), ref)


def test_one_microbatch_matches_many(dense_ref):
    path, ref = dense_ref
    assert_same_step(run(path, max_tokens=10_000, old=ref["old"]), ref)


@pytest.mark.parametrize("layout", [{"ep": 2}, {"tp": 2, "ep": 2}], ids=["ep2", "tp2xep2"])
def test_moe_layouts_match_single_process(moe_ref, layout):
    path, ref = moe_ref
    assert_same_step(run(path, dict(layout), old=ref["old"]), ref)


@pytest.mark.slow
@pytest.mark.parametrize(
    "layout", [{"tp": 2, "pp": 2}, {"tp": 2, "cp": 2}, {"pp": 2, "world": 4}, {"cp": 2, "world": 4}],
    ids=["tp2xpp2", "tp2xcp2", "pp2xdp2", "cp2xdp2"],
)
def test_dense_products_match_single_process(dense_ref, layout):
    path, ref = dense_ref
    assert_same_step(run(path, dict(layout), old=ref["old"]), ref)


@pytest.mark.slow
def test_moe_pipeline_and_expert_parallel(moe_ref):
    path, ref = moe_ref
    assert_same_step(run(path, {"pp": 2, "ep": 2}, old=ref["old"]), ref)


def test_log_probs_equal_transformers(dense_ref, moe_ref):
    from transformers import AutoModelForCausalLM

    batch = make_batch()
    for path, ref in (dense_ref, moe_ref):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        for i, (p, r) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
            ids = torch.cat([p, r]).unsqueeze(0)
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            expected = logp[p.numel() - 1 : ids.shape[1] - 1].gather(-1, r.unsqueeze(-1)).squeeze(-1)
            torch.testing.assert_close(ref["log_probs"][i], expected, rtol=0, atol=1e-5)
