"""CPU threads of the actor ranks while the engines start (the warm-up overlaps the engines' start)."""
import pytest

from megatron_rl.cluster.placement import threads_beside_starting_engines


@pytest.mark.parametrize("threads, ranks, engines, cpus, expected", [
    (2, 1, 1, 2, 1),    # the quickstart: one core for the starting engine, one for the rank
    (8, 1, 1, 16, 8),   # enough cores: the rank keeps its setting
    (4, 2, 2, 8, 3),    # 6 cores left for 2 ranks
    (2, 2, 1, 2, 1),    # never below one thread
    (1, 1, 4, 2, 1),
])
def test_ranks_share_the_cores_the_starting_engines_leave(threads, ranks, engines, cpus, expected):
    assert threads_beside_starting_engines(threads, ranks, engines, cpus) == expected
