"""Sampling decisions are made once, on rank 0, and broadcast (docs/design.md, contract 3), over real gloo ranks.

Each rank holds a *different* local view of the same rollouts (as after non-deterministic reward recomputation):
deciding locally would give every rank a different batch. After the broadcast every rank must hold rank 0's
selection, which the parent recomputes single-process from rank 0's view. Sample ids are integers, so the
comparison is exact (no tolerance).
"""
import pytest
import torch

from megatron_rl.algorithms.dynamic_sampling import DynamicSamplingConfig, GroupOutcome, fill_batch, select_round
from megatron_rl.algorithms.lspo import LSPOConfig
from megatron_rl.algorithms.rank0 import (
    Rank0DecisionError,
    broadcast_indices,
    decide_on_rank0,
    select_on_rank0,
)
from megatron_rl.parallel.spawn import spawn_ranks

WORLD = 3
N_GROUPS = 12
SAMPLING = DynamicSamplingConfig(max_rounds=4, on_cap="top_up")
LSPO = LSPOConfig()


def local_view(rank: int) -> list[GroupOutcome]:
    """Rank r's view: group (r + 1) has lost its reward variance and the lengths are shifted rank-dependently."""
    groups = []
    for i in range(N_GROUPS):
        rewards = [0.0, 1.0] if i % 4 else [1.0, 1.0]
        if i == rank + 1:
            rewards = [0.0, 0.0]
        length = 10 + (7 * i * (rank + 1)) % 53
        groups.append(GroupOutcome(rewards=rewards, response_lengths=[length, length + 2], payload=i))
    return groups


def choose_indices(groups):
    """The per-round decision: ids (payloads) of the groups both filters keep."""
    sel = select_round(groups, SAMPLING, LSPO)
    return [g.payload for g, k in zip(groups, sel.kept.tolist()) if k]


def _boom():
    raise ValueError("bad rollout on the deciding rank")


def _rank_fn():
    import torch.distributed as dist

    rank = dist.get_rank()
    groups = local_view(rank)
    out = {"local_choice": choose_indices(groups)}

    # 1. index selection as tensors
    chosen = select_on_rank0(choose_indices, groups)
    out["chosen"] = chosen.tolist()
    out["batch"] = [groups[i].payload for i in chosen.tolist()]  # each rank gathers its own samples by id

    # 2. the whole over-sampling loop runs on rank 0 only; the other ranks never call the generator
    calls = []

    def generate_round(round_index):
        calls.append(round_index)
        return local_view(rank)[round_index * 4 : round_index * 4 + 4]

    filled = decide_on_rank0(fill_batch, generate_round, 6, SAMPLING, LSPO)
    out["filled"] = (filled.payloads, filled.sources, filled.metrics.as_dict())
    out["generator_calls"] = len(calls)

    # 3. another source rank, and a plain index broadcast
    out["from_rank1"] = decide_on_rank0(lambda: ("rank", dist.get_rank()), src=1)
    out["bcast"] = broadcast_indices(torch.tensor([5, 3, 9]) if rank == 0 else None).tolist()
    out["empty"] = broadcast_indices([] if rank == 0 else None).tolist()

    # 4. a failure on the deciding rank reaches every rank instead of hanging the others
    errors = []
    for fn in (decide_on_rank0, select_on_rank0):
        try:
            fn(_boom)
        except ValueError as e:
            errors.append(("ValueError", str(e)))
        except Rank0DecisionError as e:
            errors.append(("Rank0DecisionError", "bad rollout" in str(e) or "rank 0" in str(e)))
    out["errors"] = errors
    try:  # a result that cannot be pickled fails on rank 0 before the broadcast, not inside it
        decide_on_rank0(lambda: (lambda: 1))
        out["unpicklable"] = "no error"
    except Rank0DecisionError:
        out["unpicklable"] = "Rank0DecisionError"
    except Exception as e:  # noqa: BLE001 - rank 0 sees pickle's own error type
        out["unpicklable"] = "local " + type(e).__name__

    # 5. the group still works afterwards (no half-finished collective left behind)
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    out["sum_after"] = t.item()
    return out


@pytest.mark.distributed
def test_every_rank_ends_with_rank0_selection():
    results = spawn_ranks(_rank_fn, WORLD, timeout=240)

    reference = choose_indices(local_view(0))  # single-process decision on rank 0's view
    local_choices = [r["local_choice"] for r in results]
    assert len({tuple(c) for c in local_choices}) == WORLD, "test is void: the local views should disagree"
    for rank, r in enumerate(results):
        assert r["chosen"] == reference, rank
        assert r["batch"] == reference, rank

    calls = []
    ref_filled = fill_batch(lambda k: (calls.append(k), local_view(0)[k * 4 : k * 4 + 4])[1], 6, SAMPLING, LSPO)
    expected = (ref_filled.payloads, ref_filled.sources, ref_filled.metrics.as_dict())
    assert len(ref_filled.payloads) == 6
    for rank, r in enumerate(results):
        assert repr(r["filled"]) == repr(expected), rank  # repr: the metrics may hold NaN, NaN != NaN
        assert r["generator_calls"] == (len(calls) if rank == 0 else 0), rank
        assert r["from_rank1"] == ("rank", 1)
        assert r["bcast"] == [5, 3, 9] and r["empty"] == []
        assert r["sum_after"] == 0.0 + 1.0 + 2.0

    assert results[0]["errors"] == [("ValueError", "bad rollout on the deciding rank")] * 2
    assert results[0]["unpicklable"].startswith("local ")
    for r in results[1:]:
        assert r["errors"] == [("Rank0DecisionError", True)] * 2
        assert r["unpicklable"] == "Rank0DecisionError"


def test_without_a_process_group_the_decision_runs_locally():
    assert decide_on_rank0(lambda a, b=0: a + b, 2, b=3) == 5
    assert select_on_rank0(lambda: [4, 1]).tolist() == [4, 1]
    assert broadcast_indices(torch.tensor([2, 0], dtype=torch.int32)).dtype == torch.int64
    with pytest.raises(ValueError, match="integers"):
        select_on_rank0(lambda: [0.5])
    with pytest.raises(ValueError, match="1-D"):
        broadcast_indices([[1, 2]])
