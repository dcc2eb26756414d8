"""Ray placement shared by the Megatron actor group and the rollout pool (split and colocated modes).

Split mode (`resources.colocate: false`): the actor group reserves one bundle per rank, each engine its own
placement group (`RolloutPool._bundles`). Colocated mode (`resources.colocate: true`; docs/design.md:
colocated and split are configuration, not code forks): the engines reserve nothing of their own; engine e runs in
the actor group's placement group, its TP rank k in bundle `e * tp + k` (one actor rank's bundle), so on GPU every
engine TP rank lands on an actor rank's GPU. Ray then has to fit both in one bundle: each side takes
`COLOCATED_GPU_SHARE` of the bundle's GPU (as in OpenRLHF/verl's Ray colocation, where actor and vLLM worker each
take a fraction of one GPU) and the engines take no CPU (they run while the actor ranks wait, and vice versa).
On GPU the memory hand-off is vLLM's sleep mode (the engines sleep while the actors train), see `RolloutPool.sleep`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Ray GPU resource each side (actor rank, engine TP rank) takes from a shared {"GPU": 1} bundle when colocated.
# This is a scheduling share, not memory: memory is split by vLLM's gpu_memory_utilization and sleep mode.
COLOCATED_GPU_SHARE = 0.5


def reserve_placement_group(bundles: list[dict[str, float]], strategy: str, timeout_s: float, what: str,
                            fix: str) -> Any:
    """A ready placement group of `bundles`; on timeout it is removed and a RuntimeError names `what` and `fix`."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    group = placement_group([dict(b) for b in bundles], strategy=strategy)
    try:
        ray.get(group.ready(), timeout=timeout_s)
    except ray.exceptions.GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"{what}: Ray could not reserve {bundles} within {timeout_s}s (available: {ray.available_resources()}). "
            f"{fix}"
        ) from None
    return group


def in_bundle(group: Any, bundle_index: int, *, capture_child_tasks: bool = False) -> Any:
    """Ray scheduling strategy: run in bundle `bundle_index` of placement group `group`."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle_index,
                                            placement_group_capture_child_tasks=capture_child_tasks)


def colocated_engine_bundles(num_engines: int, tensor_parallel_size: int, num_bundles: int) -> list[list[int]]:
    """Bundle indices of each engine's TP ranks in the actor group's placement group: engine e gets bundles
    e*tp .. e*tp+tp-1. Raises ValueError when the engines' ranks outnumber the actor ranks."""
    needed = num_engines * tensor_parallel_size
    if needed > num_bundles:
        raise ValueError(
            f"rollout.num_engines ({num_engines}) x rollout.engine.tensor_parallel_size ({tensor_parallel_size}) = "
            f"{needed} engine ranks, but colocation places one engine rank per actor rank and there are "
            f"resources.actor_ranks={num_bundles}: lower num_engines / tensor_parallel_size or add actor ranks"
        )
    return [engine_bundle_indices(e, tensor_parallel_size) for e in range(num_engines)]


def engine_bundle_indices(engine_id: int, tensor_parallel_size: int) -> list[int]:
    """Colocated: the bundles (= actor ranks) of engine `engine_id`'s TP ranks, e*tp .. e*tp+tp-1, in TP order."""
    tp = tensor_parallel_size
    return list(range(engine_id * tp, (engine_id + 1) * tp))


@dataclass(frozen=True)
class ColocatedPlacement:
    """Where colocated engines run: the actor group's placement group and each engine's bundle indices."""

    placement_group: Any
    engine_bundles: list[list[int]]

    @classmethod
    def on(cls, placement_group: Any, num_bundles: int, num_engines: int, tensor_parallel_size: int):
        return cls(placement_group, colocated_engine_bundles(num_engines, tensor_parallel_size, num_bundles))


def threads_beside_starting_engines(threads_per_rank: int, actor_ranks: int, num_engines: int, num_cpus: int) -> int:
    """CPU device: torch threads per actor rank for work that overlaps the engines' start (the trainer's supervised
    warm-up). An engine's start keeps one core busy (importing vLLM, loading the model: single-threaded Python), so
    the ranks share the cores left, never more than their own setting and at least one each. Oversubscribed OpenMP
    threads spin at every op's barrier waiting for a descheduled peer: on 2 cores the quickstart's 80 warm-up steps
    took 12 s with 2 threads beside a starting engine and 5.4-6.4 s with 1 (tools/BENCHMARKS.md, "Start-up and
    shutdown")."""
    free = max(1, (num_cpus - num_engines) // actor_ranks)
    return max(1, min(threads_per_rank, free))
