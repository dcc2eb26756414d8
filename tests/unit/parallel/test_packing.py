"""Token balancing over DP ranks and micro-batches, and the packed (THD) / padded micro-batch layouts under CP and
TP: every response label is computed exactly once, on exactly one CP rank, at the right token, whatever the layout.
(The numerical equality of packed and padded training steps is in tests/distributed/test_actor_invariance.py.)"""
import random

import pytest
import torch

from megatron_rl.actor.batch import ActorBatch, build_microbatch, plan_microbatches
from megatron_rl.parallel.packing import balanced_partition, thd_cp_local_index


def test_balanced_partition_is_a_partition_within_one_item_of_balance():
    rng = random.Random(0)
    weights = [rng.randint(1, 500) for _ in range(37)]
    for bins in (1, 2, 3, 8):
        parts = balanced_partition(weights, bins)
        assert sorted(i for p in parts for i in p) == list(range(len(weights)))
        loads = [sum(weights[i] for i in p) for p in parts]
        # LPT: the heaviest bin's last item went into the then-lightest bin, so max - min <= the largest item
        assert max(loads) - min(loads) <= max(weights)
        assert parts == balanced_partition(weights, bins)  # deterministic: every rank computes the same plan
    with pytest.raises(ValueError, match="num_bins"):
        balanced_partition(weights, 0)


def test_balanced_partition_beats_round_robin_on_rl_lengths():
    lengths = [1000, 900, 100, 100, 100, 100, 80, 60]  # a few long answers among short ones
    loads = [sum(lengths[i] for i in p) for p in balanced_partition(lengths, 2)]
    # the optimum here (no subset sums to 1220); round-robin (0,2,4,6 | 1,3,5,7) would give 1280 vs 1160
    assert sorted(loads) == [1200, 1240]


@pytest.mark.parametrize("dp, max_tokens, multiple", [(1, 10_000, 1), (2, 300, 1), (4, 200, 1), (2, 300, 4), (8, 50, 1)])
def test_plan_same_microbatch_count_everywhere_every_sample_once(dp, max_tokens, multiple):
    rng = random.Random(dp * 100 + max_tokens)
    lengths = [rng.randint(5, 120) for _ in range(13)]
    plan = plan_microbatches(lengths, dp, max_tokens, multiple_of=multiple)
    assert len(plan) == dp
    num_mb = {len(rank) for rank in plan}
    assert len(num_mb) == 1 and next(iter(num_mb)) % multiple == 0  # lock-step schedules / EP all-to-alls
    assert sorted(i for rank in plan for mb in rank for i in mb) == list(range(len(lengths)))
    rank_loads = [sum(lengths[i] for mb in rank for i in mb) for rank in plan]
    assert max(rank_loads) - min(rank_loads) <= max(lengths)
    # enough micro-batches that the busiest rank's tokens fit the budget on average
    assert max(rank_loads) <= len(plan[0]) * max_tokens


def test_more_ranks_than_sequences_gives_empty_microbatches():
    plan = plan_microbatches([10, 20, 30], dp_size=4, max_tokens_per_microbatch=1000)
    assert [len(rank) for rank in plan] == [1, 1, 1, 1]
    assert sorted(len(rank[0]) for rank in plan) == [0, 1, 1, 1]  # one rank runs a dummy micro-batch


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_thd_cp_ranks_hold_load_balanced_chunks(cp):
    lengths = [2 * cp * n for n in (1, 3, 2)]
    held = [thd_cp_local_index(lengths, cp, r) for r in range(cp)]
    assert sorted(torch.cat(held).tolist()) == list(range(sum(lengths)))  # every token on exactly one rank
    chunk = lengths[0] // (2 * cp)
    for r in range(cp):  # first sequence: chunks r and 2cp-1-r (Megatron's load-balanced CP layout)
        expected = list(range(r * chunk, (r + 1) * chunk)) + list(range((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk))
        assert held[r][: 2 * chunk].tolist() == expected
    if cp > 1:
        with pytest.raises(ValueError, match="multiple of 2\\*cp"):
            thd_cp_local_index([2 * cp + 1], cp, 0)


def _batch(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 100, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g) for _ in range(n)]
    responses = [torch.randint(3, 100, (int(torch.randint(1, 15, (1,), generator=g)),), generator=g) for _ in range(n)]
    mask = [torch.rand(r.numel(), generator=g) > 0.2 for r in responses]
    return ActorBatch(prompt_ids=prompts, response_ids=responses, advantages=torch.randn(n, generator=g),
                      old_log_probs=[torch.randn(r.numel(), generator=g) for r in responses], loss_mask=mask)


def _labels(mb):
    """{(sample id, response column): label token} for the labels this micro-batch computes."""
    flat = mb.labels.reshape(-1)[mb.label_index]
    return {(mb.sample_ids[int(r)], int(c)): int(t) for r, c, t in zip(mb.rows, mb.cols, flat)}


@pytest.mark.parametrize("packing", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("tp, cp", [(1, 1), (2, 1), (1, 2), (2, 2), (1, 3)])
def test_every_response_label_once_at_the_right_token(packing, tp, cp):
    batch = _batch()
    ids = [0, 2, 3, 4]
    per_rank = [build_microbatch(batch, ids, packing=packing, tp=tp, cp=cp, cp_rank=r, pad_id=1) for r in range(cp)]
    expected = {(i, c): int(batch.response_ids[i][c]) for i in ids for c in range(batch.response_ids[i].numel())}
    seen = {}
    for mb in per_rank:
        mine = _labels(mb)
        assert not set(mine) & set(seen), "a label computed on two CP ranks"
        seen.update(mine)
        # the token fed at a label's position is the one before it (prompt's last token for column 0)
        flat_tokens = mb.tokens.reshape(-1)[mb.label_index]
        for (i, c), tok in zip(mine, flat_tokens.tolist()):
            previous = batch.prompt_ids[i][-1] if c == 0 else batch.response_ids[i][c - 1]
            assert tok == int(previous)
        # the model input splits over CP and then over TP (sequence parallelism)
        assert mb.tokens.shape[-1] % tp == 0
        if packing:
            assert mb.tokens.shape[0] == 1 and mb.packed_seq_params.qkv_format == "thd"
            padded = mb.packed_seq_params.cu_seqlens_q_padded
            assert all(int(n) % (2 * cp if cp > 1 else 1) == 0 for n in padded[1:] - padded[:-1])
            assert int(padded[-1]) == mb.tokens.shape[-1] * cp
        else:
            assert mb.tokens.shape[0] == len(ids) and mb.packed_seq_params is None
    assert seen == expected
    # the loss mask: a column counts on the rank that computes it iff the batch's loss_mask keeps it
    kept = sum(int(mb.mask.sum()) for mb in per_rank)
    assert kept == sum(int(batch.loss_mask[i].sum()) for i in ids)


def test_packing_removes_the_padding_tokens():
    """10x length spread: the packed stream holds the real tokens only; padding every row to the longest
    holds about twice as many (the benchmark's packed-vs-padded case)."""
    prompts = [torch.arange(3, 8) for _ in range(8)]
    responses = [torch.arange(3, 3 + n) for n in (5, 10, 15, 20, 30, 40, 50, 55)]
    batch = ActorBatch(prompt_ids=prompts, response_ids=responses)
    real = sum(batch.sequence_lengths)
    packed = build_microbatch(batch, list(range(8)), packing=True)
    padded = build_microbatch(batch, list(range(8)), packing=False)
    assert packed.num_model_tokens == real
    assert padded.num_model_tokens == 8 * max(batch.sequence_lengths) > 1.8 * real
    positions = packed.positions.reshape(-1)  # RoPE positions restart at every packed sequence
    assert positions[:5].tolist() == [0, 1, 2, 3, 4] and positions[10:12].tolist() == [0, 1]


def test_dummy_microbatch_has_no_labels():
    mb = build_microbatch(_batch(), [], packing=True, tp=2, cp=2, cp_rank=1)
    assert mb.num_rows == 0 and mb.label_index.numel() == 0 and mb.tokens.shape[-1] % 2 == 0
