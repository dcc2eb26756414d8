"""Splitting prompts over engines, per-prompt seeds, and the exactly-once assembly of completions."""
import pytest

from megatron_rl.rollout.sharding import CompletionAccountingError, assemble_completions, prompt_seed, split_prompts
from megatron_rl.rollout.types import Completion


@pytest.mark.parametrize("num_prompts", [0, 1, 2, 5, 7, 64])
@pytest.mark.parametrize("num_shares", [1, 2, 3, 8])
def test_split_covers_every_prompt_once_in_balanced_contiguous_shares(num_prompts, num_shares):
    shares = split_prompts(num_prompts, num_shares)
    assert [i for share in shares for i in share] == list(range(num_prompts))
    assert len(shares) == min(num_prompts, num_shares)
    if shares:
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    for share in shares:
        assert share == list(range(share[0], share[-1] + 1))


def test_split_rejects_nonsense():
    with pytest.raises(ValueError):
        split_prompts(3, 0)


def test_prompt_seed_depends_only_on_seed_and_prompt():
    assert prompt_seed(None, 3) is None
    assert prompt_seed(7, 3) == prompt_seed(7, 3)
    seeds = {prompt_seed(7, i) for i in range(1000)} | {prompt_seed(8, i) for i in range(1000)}
    assert len(seeds) == 2000  # no collisions between prompts or base seeds
    # vLLM gives sample j the seed prompt_seed + j: neighbouring prompts must not share sample seeds
    assert all(0 <= s < 2**62 for s in seeds)


def _c(p, s, engine=0):
    return Completion(p, s, [1], [2], [-0.1], "x", "length", engine_id=engine)


def test_assemble_orders_by_prompt_then_sample():
    shuffled = [_c(1, 1), _c(0, 1), _c(1, 0), _c(0, 0)]
    assert [(c.prompt_index, c.sample_index) for c in assemble_completions(shuffled, 2, 2)] == [
        (0, 0), (0, 1), (1, 0), (1, 1)
    ]


def test_assemble_refuses_duplicates_missing_and_unknown():
    with pytest.raises(CompletionAccountingError, match=r"\(0, 1\) came back twice \(engines 0 and 1\)"):
        assemble_completions([_c(0, 0), _c(0, 1), _c(0, 1, engine=1)], 1, 2)
    with pytest.raises(CompletionAccountingError, match="1 completions never came back"):
        assemble_completions([_c(0, 0), _c(1, 0), _c(1, 1)], 2, 2)
    with pytest.raises(CompletionAccountingError, match="outside 1 prompts x 2 samples"):
        assemble_completions([_c(0, 0), _c(0, 2)], 1, 2)
