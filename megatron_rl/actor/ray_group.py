"""The Megatron actor world as Ray actors: one `MegatronActor` per rank, driven from the trainer process.

    group = ActorGroup(actor_config, world_size=4, device="cpu")    # places ranks, inits torch.distributed
    old = group.compute_log_probs(batch)                            # every rank runs it; rank 0's result
    metrics = group.train_step(batch)                               # one optimizer step over the whole batch
    pool.update_weights(group.weight_buckets(bucket_bytes))          # rank 0 streams HF buckets; others help gather
    group.shutdown()

Each method mirrors the `MegatronActor` method of the same name (megatron_rl/actor/megatron_actor.py): the same
arguments, called on every rank at once (the methods are collective), the result of global rank 0 returned. The batch
is put into Ray's object store once and every rank reads it from there.

Placement: one placement group with one bundle per rank ({"CPU": k} on CPU, {"GPU": 1, "CPU": k} on GPU), PACK
strategy, rank r in bundle r, so consecutive ranks (a TP group) share a node when they fit. With colocated rollout
engines (`gpu_share` < 1, see megatron_rl/cluster/placement.py) each rank takes only that share of its bundle's GPU
and the engines run in the same bundles (`placement_group`). Rank 0 picks the
rendezvous address (its node IP and a free port); every rank then joins torch.distributed (gloo on CPU, nccl on
GPU) and builds its shard of the model. A failure on any rank surfaces as the first rank's traceback.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

from megatron_rl.actor.batch import ActorBatch
from megatron_rl.actor.config import ActorConfig
from megatron_rl.faults import propagated_env


class _MegatronWorker:
    """Body of one rank's Ray actor (wrapped with ray.remote by ActorGroup)."""

    def __init__(self, rank: int, world_size: int, threads: int, env: dict[str, str]):
        os.environ.update(env)
        self.rank, self.world_size = rank, world_size
        self.threads = threads
        self.actor = None

    def rendezvous_address(self) -> tuple[str, int]:
        import ray

        from megatron_rl.parallel.spawn import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, config: ActorConfig, master_addr: str, master_port: int) -> dict:
        import torch
        import torch.distributed as dist

        from megatron_rl.actor.megatron_actor import MegatronActor

        torch.set_num_threads(self.threads)
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(self.rank),
                          WORLD_SIZE=str(self.world_size), LOCAL_RANK="0")
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(0)  # Ray sets CUDA_VISIBLE_DEVICES to this actor's GPU
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world_size)
        self.actor = MegatronActor(config).setup()
        return {"rank": self.rank, "dp_size": self.actor.dp_size}

    def call(self, method: str, *args, **kwargs) -> Any:
        return getattr(self.actor, method)(*args, **kwargs)

    def weight_buckets(self, bucket_bytes: int) -> Iterator[list]:
        """Streaming generator: every rank takes part in the collective export; rank 0 yields the buckets."""
        for bucket in self.actor.export_hf_weights(bucket_bytes=bucket_bytes, dst=0):
            if self.rank == 0:
                yield bucket

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self.actor is not None:
            self.actor.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()


class ActorGroup:
    """`world_size` Megatron ranks as Ray actors (see the module docstring)."""

    def __init__(self, config: ActorConfig, world_size: int, *, device: str = "cpu", cpus_per_rank: int = 1,
                 threads_per_rank: int | None = None, timeout_s: float = 3600.0, env: dict[str, str] | None = None,
                 gpu_share: float = 1.0):
        import ray

        from megatron_rl.cluster.placement import in_bundle, reserve_placement_group
        from megatron_rl.cluster.ray_cluster import require_ray

        require_ray()
        if not 0 < gpu_share <= 1:
            raise ValueError(f"gpu_share must be in (0, 1], got {gpu_share}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        bundle = {"CPU": cpus_per_rank} if device == "cpu" else {"GPU": 1, "CPU": cpus_per_rank}
        self._pg = reserve_placement_group(
            [bundle] * world_size, "PACK", timeout_s, f"{world_size} actor rank(s)",
            "Start Ray with more resources or lower resources.actor_ranks / actor_cpus_per_rank",
        )
        worker_cls = ray.remote(_MegatronWorker)
        threads = threads_per_rank or cpus_per_rank
        base_env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads), **propagated_env(),
                    **(env or {})}
        self.workers = [
            worker_cls.options(
                num_cpus=cpus_per_rank, num_gpus=0 if device == "cpu" else gpu_share,
                scheduling_strategy=in_bundle(self._pg, rank),
            ).remote(rank, world_size, threads, base_env)
            for rank in range(world_size)
        ]
        try:
            addr, port = ray.get(self.workers[0].rendezvous_address.remote(), timeout=timeout_s)
            self.info = self._get([w.setup.remote(config, addr, port) for w in self.workers])
        except BaseException:
            self.shutdown()
            raise

    @property
    def placement_group(self):
        """The ranks' placement group (rank r in bundle r); colocated engines are placed in it too."""
        return self._pg

    def _get(self, refs):
        import ray

        return ray.get(refs, timeout=self.timeout_s)

    # ---- the actor's collective methods, typed ------------------------------------------------------------
    def compute_log_probs(self, batch: ActorBatch, *, model: str = "policy", with_entropy: bool = False) -> list:
        """Per-sequence response log-probs under the policy or the KL reference (`MegatronActor.compute_log_probs`)."""
        return self._call_all("compute_log_probs", batch, model=model, with_entropy=with_entropy)[0]

    def train_step(self, batch: ActorBatch, *, objective: str = "policy", max_response_length: int | None = None,
                   lr: float | None = None, old_from_forward: bool = False) -> dict:
        """One optimizer step over the whole batch; the reduced metrics (`MegatronActor.train_step`; with
        old_from_forward also the forward's per-sequence log-probs under "log_probs")."""
        return self._call_all("train_step", batch, objective=objective, max_response_length=max_response_length,
                              lr=lr, old_from_forward=old_from_forward)[0]

    def reset_optimizer_state(self) -> None:
        """Forget the optimizer's moments and step count (after the supervised warm-up)."""
        self._call_all("reset_optimizer_state")

    def reset_reference_to_policy(self) -> None:
        """Make the KL reference a frozen copy of the current policy (`MegatronActor.reset_reference_to_policy`)."""
        self._call_all("reset_reference_to_policy")

    def save_checkpoint(self, ckpt_dir: str) -> dict:
        """Write model, optimizer (and a reset KL reference) into `ckpt_dir`; the small state for trainer_state.json."""
        return self._call_all("save_checkpoint", ckpt_dir)[0]

    def load_checkpoint(self, ckpt_dir: str, state: dict | None = None, *, load_optimizer: bool = True) -> None:
        """Restore what `save_checkpoint` wrote (any saved layout)."""
        self._call_all("load_checkpoint", ckpt_dir, state, load_optimizer=load_optimizer)

    def _call_all(self, method: str, *args, **kwargs) -> list:
        """Call `MegatronActor.<method>(*args, **kwargs)` on every rank; the results, by rank."""
        import ray

        args_ref = [ray.put(a) for a in args]  # one copy in the object store, not one per rank
        return self._get([w.call.remote(method, *args_ref, **kwargs) for w in self.workers])

    def weight_buckets(self, bucket_bytes: int = 256 * 1024**2) -> Iterator[list]:
        """The model as buckets of full HF-named tensors, streamed from rank 0 while every rank takes part."""
        import ray

        streams = [w.weight_buckets.options(num_returns="streaming").remote(bucket_bytes) for w in self.workers]
        for ref in streams[0]:
            yield ray.get(ref)
        for stream in streams[1:]:  # the other ranks yield nothing; wait for them to finish (and raise errors)
            for ref in stream:
                ray.get(ref)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([w.shutdown.remote() for w in getattr(self, "workers", [])], timeout=60)
        except Exception:  # noqa: BLE001 - a dead rank cannot shut down cleanly; kill below
            pass
        for w in getattr(self, "workers", []):
            ray.kill(w)
        self.workers = []
        if getattr(self, "_pg", None) is not None:
            remove_placement_group(self._pg)
            self._pg = None
