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
# Weight export in buckets of at most this many bytes: above the largest tiny-model tensor (the 512 x 128 fp32
# embedding, 262144 bytes), far below the model (~1.7 MB), so every export here is several buckets.
EXPORT_BUCKET_BYTES = 300_000


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


def batch_from_plain(plain: dict) -> ActorBatch:
    """An ActorBatch from plain lists (prompts, responses, routed: what crosses to spawned ranks; tensors would go
    as shared-memory file descriptors), with the same random advantages as make_batch's."""
    n = len(plain["prompts"])
    return ActorBatch(prompt_ids=[torch.tensor(p) for p in plain["prompts"]],
                      response_ids=[torch.tensor(r) for r in plain["responses"]],
                      routed_experts=[torch.tensor(r, dtype=torch.uint8) for r in plain["routed"]]
                      if plain.get("routed") is not None else None,
                      advantages=torch.randn(n, generator=torch.Generator().manual_seed(0)))


def _train_rank(path, layout, packing, max_tokens, old_log_probs, loss="luspo", entropy_coef=0.0,
                exclude_fully_masked=False, masked_rows=(), plain_batch=None, actor_options=None):
    cfg = ActorConfig(
        model_path=path, layout=ParallelLayout(**layout), packing=packing, max_tokens_per_microbatch=max_tokens,
        optimizer=OptimizerSettings(name="sgd", lr=0.05, weight_decay=0.0, clip_grad=0.0),
        loss=PolicyLossSettings(name=loss, entropy_coef=entropy_coef, exclude_fully_masked=exclude_fully_masked),
        **(actor_options or {}),
    )
    actor = MegatronActor(cfg).setup()
    batch = make_batch() if plain_batch is None else batch_from_plain(plain_batch)
    if masked_rows:  # these responses are left out of the loss entirely (e.g. truncated, DAPO overlong filtering)
        batch.loss_mask = [torch.full(r.shape, i not in masked_rows, dtype=torch.bool)
                           for i, r in enumerate(batch.response_ids)]
    holder = [actor.compute_log_probs(batch, with_entropy=True)]
    torch.distributed.broadcast_object_list(holder, src=0)
    log_probs, entropies = [lp for lp, _ in holder[0]], [ent for _, ent in holder[0]]
    batch.old_log_probs = old_log_probs if old_log_probs is not None else perturbed(log_probs)

    def weights():
        out, bucket_sizes = {}, []
        for bucket in actor.export_hf_weights(bucket_bytes=EXPORT_BUCKET_BYTES, dst=0):
            out.update(bucket)
            bucket_sizes.append(sum(t.numel() * t.element_size() for _, t in bucket))
        return out, bucket_sizes

    before, bucket_sizes = weights()
    metrics = actor.train_step(batch)
    after, _ = weights()
    actor.shutdown()
    if torch.distributed.get_rank() != 0:
        return None
    return {"log_probs": log_probs, "entropies": entropies, "old": batch.old_log_probs, "metrics": metrics,
            "delta": {k: after[k] - before[k] for k in after}, "bucket_sizes": bucket_sizes}


def run(path, layout=None, packing=True, max_tokens=48, old=None, loss="luspo", entropy_coef=0.0,
        exclude_fully_masked=False, masked_rows=(), plain_batch=None, actor_options=None):
    """One train step in `layout` (world: DP ranks beyond the model-parallel ones); plain_batch (batch_from_plain)
    replaces make_batch(); actor_options: further ActorConfig fields."""
    layout = dict(layout or {})
    world = layout.pop("world", None)
    lay = ParallelLayout(**layout)
    world = world or max(lay.model_parallel_size, lay.etp * lay.ep * lay.pp)
    args = (path, layout, packing, max_tokens, old, loss, entropy_coef, exclude_fully_masked, masked_rows,
            plain_batch, actor_options)
    return spawn_ranks(_train_rank, world, args=args, timeout=600)[0]


def assert_same_step(case, ref):
    for key in ("loss", "grad_norm"):
        a, b = case["metrics"][key], ref["metrics"][key]
        assert abs(a - b) <= RTOL * abs(b), (key, a, b)
    assert case["delta"].keys() == ref["delta"].keys(), "the export does not hold the same HF tensors"
    num = sum(float((case["delta"][k] - ref["delta"][k]).pow(2).sum()) for k in ref["delta"])
    den = sum(float(ref["delta"][k].pow(2).sum()) for k in ref["delta"])
    assert den > 0, "the reference step changed no weight"
    assert (num / den) ** 0.5 <= RTOL, ("weight update differs", (num / den) ** 0.5)
    # forward-only log-probs and entropies (|H| <= log 512 ~ 6.2) agree to float-sum-order noise
    for a, b in zip(case["log_probs"] + case["entropies"], ref["log_probs"] + ref["entropies"]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    # the export is bucketed in every layout: several buckets, none above the bound
    assert len(case["bucket_sizes"]) >= 3 and max(case["bucket_sizes"]) <= EXPORT_BUCKET_BYTES, case["bucket_sizes"]


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
    assert len(ref["bucket_sizes"]) >= 3 and max(ref["bucket_sizes"]) <= EXPORT_BUCKET_BYTES


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
@pytest.mark.parametrize("loss", ["dapo", "grpo", "gspo"])
def test_other_registered_losses_match_under_dp_and_cp(dense_ref, loss):
    """Token-mean (DAPO), per-sequence token-mean (GRPO) and sequence-ratio (GSPO) normalisers go through the same
    global counts: DP=2 x CP=2 with unequal tokens per rank == one process."""
    path, luspo_ref = dense_ref
    ref = run(path, old=luspo_ref["old"], loss=loss)
    assert_same_step(run(path, {"cp": 2, "world": 4}, old=luspo_ref["old"], loss=loss), ref)


def test_exclude_fully_masked_rescales_the_step_and_holds_under_cp_and_dp(dense_ref):
    """actor.loss.exclude_fully_masked: 2 of 6 responses fully masked, LUSPO divides by the 4 non-empty rows instead
    of 6, so loss and gradient are exactly 6/4 times the default (SGD, no clipping; fp32 rounding, 1e-5); and the
    non-empty count is global: DP=2 x CP=2 (the masked rows land on different ranks) == one process."""
    path, luspo_ref = dense_ref
    masked = (0, 3)
    default = run(path, old=luspo_ref["old"], masked_rows=masked)
    ref = run(path, old=luspo_ref["old"], masked_rows=masked, exclude_fully_masked=True)
    for key in ("loss", "grad_norm"):
        a, b = ref["metrics"][key], 6 / 4 * default["metrics"][key]
        assert b != 0 and abs(a - b) <= RTOL * abs(b), (key, a, b)
    assert_same_step(
        run(path, {"cp": 2, "world": 4}, old=luspo_ref["old"], masked_rows=masked, exclude_fully_masked=True), ref
    )


@pytest.mark.slow
def test_moe_pipeline_and_expert_parallel(moe_ref):
    path, ref = moe_ref
    assert_same_step(run(path, {"pp": 2, "ep": 2}, old=ref["old"]), ref)


def hf_log_probs_and_entropies(path, batch):
    """transformers' per-response-token log-probs and full-vocabulary entropies (fp32), one sequence at a time."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    log_probs, entropies = [], []
    for p, r in zip(batch.prompt_ids, batch.response_ids):
        ids = torch.cat([p, r]).unsqueeze(0)
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)[p.numel() - 1 : ids.shape[1] - 1]
        log_probs.append(logp.gather(-1, r.unsqueeze(-1)).squeeze(-1))
        entropies.append(-(logp.exp() * logp).sum(-1))
    return log_probs, entropies


def test_log_probs_and_entropies_equal_transformers(dense_ref, moe_ref):
    """atol 1e-5 on log-probs ~ -6 and entropies ~ 6 (fp32): only the order of float sums differs."""
    for path, ref in (dense_ref, moe_ref):
        log_probs, entropies = hf_log_probs_and_entropies(path, make_batch())
        for got, expected in zip(ref["log_probs"] + ref["entropies"], log_probs + entropies):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.slow
def test_entropy_bonus_gradient_matches_under_tp(dense_ref):
    """The entropy term's gradient crosses the vocab-parallel all-reduces (token_entropy): TP=2 == TP=1."""
    path, no_bonus = dense_ref
    ref = run(path, old=no_bonus["old"], entropy_coef=0.05)
    assert abs(ref["metrics"]["loss"] - no_bonus["metrics"]["loss"]) > 1e-3  # the bonus changes the objective
    assert_same_step(run(path, {"tp": 2}, old=no_bonus["old"], entropy_coef=0.05), ref)
