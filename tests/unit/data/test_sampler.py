import json

import pytest

from megatron_rl.data import ResumableSampler


def test_resume_yields_exactly_the_prompts_that_would_have_come_next():
    """Run 1 is interrupted after 4 batches (mid-epoch), its state goes through a JSON checkpoint, run 2 resumes
    and must hand out exactly what run 1 handed out next -- across two epoch boundaries."""
    batch = 7
    uninterrupted = ResumableSampler(num_items=10, seed=123)
    reference = [uninterrupted.next_indices(batch) for _ in range(10)]

    interrupted = ResumableSampler(num_items=10, seed=123)
    before = [interrupted.next_indices(batch) for _ in range(4)]
    checkpoint = json.loads(json.dumps(interrupted.state_dict()))
    resumed = ResumableSampler(num_items=10, seed=123)
    resumed.load_state_dict(checkpoint)
    after = [resumed.next_indices(batch) for _ in range(6)]

    assert before + after == reference
    assert checkpoint["epoch"] == 2 and checkpoint["position"] == 8  # 28 indices = 2 epochs + 8


def test_each_epoch_is_a_fresh_permutation_from_seed_and_epoch():
    sampler = ResumableSampler(num_items=50, seed=7)
    epochs = [sampler.next_indices(50) for _ in range(3)]
    assert all(sorted(epoch) == list(range(50)) for epoch in epochs)  # nothing dropped or repeated in an epoch
    assert epochs[0] != epochs[1] != epochs[2]
    assert ResumableSampler(50, seed=7).next_indices(150) == sum(epochs, [])  # deterministic
    assert ResumableSampler(50, seed=8).next_indices(50) != epochs[0]
    assert ResumableSampler(50, seed=7, shuffle=False).next_indices(60) == list(range(50)) + list(range(10))


@pytest.mark.parametrize("change, message", [({"num_items": 11}, "num_items=11"), ({"seed": 1}, "seed=1"),
                                             ({"shuffle": False}, "shuffle=False")])
def test_state_from_another_dataset_or_seed_is_refused(change, message):
    state = ResumableSampler(10, seed=0).state_dict()
    with pytest.raises(ValueError, match=f"{message}.*different dataset or data seed"):
        ResumableSampler(10, seed=0).load_state_dict({**state, **change})


def test_malformed_state_is_refused():
    sampler = ResumableSampler(10)
    with pytest.raises(ValueError, match="missing"):
        sampler.load_state_dict({"seed": 0})
    with pytest.raises(ValueError, match="outside"):
        sampler.load_state_dict({**sampler.state_dict(), "position": 11})
    with pytest.raises(ValueError, match="at least one item"):
        ResumableSampler(0)
