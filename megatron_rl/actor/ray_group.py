"""The Megatron actor world as Ray actors: one `MegatronActor` per rank, driven from the trainer process.

    group = ActorGroup(actor_config, world_size=4, device="cpu")    # places ranks, inits torch.distributed
    old = group.compute_log_probs(batch)                            # every rank runs it; rank 0's result
    metrics = group.train_step(batch)                               # one optimizer step over the whole batch
    pool.update_weights(group.weight_buckets(bucket_bytes))          # rank 0 streams HF buckets; others help gather
    group.shutdown()

Each method mirrors the `MegatronActor` method of the same name (megatron_rl/actor/megatron_actor.py): the same
arguments, called on every rank at once (the methods are collective), the result of global rank 0 returned. The batch
is put into Ray's object store once and every rank reads it from there.

Fail fast (docs/training.md, "Failures"): every call waits on all ranks at once (`ray.wait`), so the death of any
rank is seen within `poll_s` and reported as a `RankFailure` naming the rank, its node and pid, what it was doing and
the last lines of its log (`<log_dir>/actor_rank<r>.log`), instead of the other ranks waiting in a collective until
it times out. A call that runs past `call_timeout_s` is reported the same way, with each unfinished rank's current
Python stack (read through a separate "monitor" thread of the actor: a rank stuck outside a collective stands out
from the ones waiting inside it). torch.distributed's own collective timeout (gloo here, NCCL on GPU) is
`collective_timeout_s`, the backstop for a hang the driver cannot see. After a failure, `shutdown(graceful=False)`
kills every rank at once (no rank is left waiting in a collective).

Placement: one placement group with one bundle per rank ({"CPU": k} on CPU, {"GPU": 1, "CPU": k} on GPU), PACK
strategy, rank r in bundle r, so consecutive ranks (a TP group) share a node when they fit. With colocated rollout
engines (`gpu_share` < 1, see megatron_rl/cluster/placement.py) each rank takes only that share of its bundle's GPU
and the engines run in the same bundles (`placement_group`). Rank 0 picks the
rendezvous address (its node IP and a free port); every rank then joins torch.distributed (gloo on CPU, nccl on
GPU) and builds its shard of the model. A failure on any rank surfaces as the first rank's traceback.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
import threading
import time
import traceback
from functools import partial
from typing import Any, Iterator

import ray

from megatron_rl.actor.batch import ActorBatch
from megatron_rl.actor.config import ActorConfig
from megatron_rl.faults import inject, propagated_env
from megatron_rl.rollout.config import OWNER_TRANSPORTS
from megatron_rl.rollout.weight_transport import TRANSPORTS, WeightOwners, make_sender


class RankFailure(RuntimeError):
    """A Megatron rank died, raised, or did not finish a call in time; the message says which, where, doing what."""

    def __init__(self, message: str, *, ranks: list[int], kind: str):
        super().__init__(message)
        self.ranks, self.kind = ranks, kind


class _Tee:
    """A text stream that writes to the original stream and to the rank's log file (line-buffered)."""

    def __init__(self, stream, log):
        self._stream, self._log = stream, log

    def write(self, text: str) -> int:
        self._log.write(text)
        self._log.flush()
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()
        self._log.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


def tail(path: str | None, lines: int = 20) -> str:
    """The last `lines` lines of a text file ("" when it does not exist)."""
    if not path or not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 64 * 1024))
        return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-lines:])


class _MegatronWorker:
    """Body of one rank's Ray actor (wrapped with ray.remote by ActorGroup)."""

    def __init__(self, rank: int, world_size: int, threads: int, env: dict[str, str], log_path: str | None = None):
        os.environ.update(env)
        self.rank, self.world_size = rank, world_size
        self.threads = threads
        self.actor = None
        # transport -> this rank's BucketSender of it (rollout/weight_transport.py), made at its first owner send
        self.owner_senders: dict[str, Any] = {}
        # transport -> (bucket bytes, actor weights revision) of its last sent / committed update
        self._sent: dict[str, tuple[int, int]] = {}
        self._committed: dict[str, tuple[int, int]] = {}
        self._running: tuple[str, float, int] | None = None  # (method, start, thread id) of the call in progress
        self.log_path = log_path
        if log_path:  # everything this rank prints also goes to its own file, which the driver tails on failure
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            log = open(log_path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115 - lives as long as the rank
            log.write(f"--- rank {rank} of {world_size}, pid {os.getpid()}, {datetime.datetime.now():%F %T}\n")
            sys.stdout, sys.stderr = _Tee(sys.stdout, log), _Tee(sys.stderr, log)

    @ray.method(concurrency_group="monitor")
    def status(self) -> dict:
        """What this rank is doing, answered by a separate thread while a call runs (ActorGroup's watchdog)."""
        running = self._running
        out = {"rank": self.rank, "pid": os.getpid(), "node": ray.util.get_node_ip_address(),
               "method": None, "running_s": 0.0, "stack": ""}
        if running is not None:
            method, start, thread_id = running
            frame = sys._current_frames().get(thread_id)
            stack = traceback.format_stack(frame)[-4:] if frame is not None else []
            out.update(method=method, running_s=time.monotonic() - start, stack="".join(stack).rstrip())
        return out

    def set_threads(self, threads: int) -> None:
        """This rank's torch/OpenMP threads from now on (ActorGroup.set_threads)."""
        import torch

        torch.set_num_threads(threads)

    def rendezvous_address(self) -> tuple[str, int]:
        import ray

        from megatron_rl.parallel.spawn import free_port

        return ray.util.get_node_ip_address(), free_port()

    def setup(self, config: ActorConfig, master_addr: str, master_port: int, collective_timeout_s: float) -> dict:
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
                                world_size=self.world_size, timeout=datetime.timedelta(seconds=collective_timeout_s))
        with self._doing("setup"):
            self.actor = MegatronActor(config).setup()
        return {"rank": self.rank, "dp_size": self.actor.dp_size, "pid": os.getpid(),
                "node": ray.util.get_node_ip_address()}

    @contextlib.contextmanager
    def _doing(self, what: str):
        """Marks the call in progress for `status` (what, since when, on which thread)."""
        self._running = (what, time.monotonic(), threading.get_ident())
        try:
            yield
        finally:
            self._running = None

    def call(self, method: str, *args, **kwargs) -> Any:
        with self._doing(method):
            return getattr(self.actor, method)(*args, **kwargs)

    def weight_buckets(self, bucket_bytes: int) -> Iterator[list]:
        """Streaming generator: every rank takes part in the collective export; rank 0 yields the buckets."""
        with self._doing("export_hf_weights"):
            for bucket in self.actor.export_hf_weights(bucket_bytes=bucket_bytes, dst=0):
                if self.rank == 0:
                    yield bucket

    def send_weights(self, engines: list, bucket_bytes: int, timeout_s: float, update_ids: list[int],
                     transport: str) -> dict:
        """Owner sends (docs/rollout.md): every rank takes part in the collective export; each sender sends its
        buckets to the engines: its own share (gloo, nccl), or every whole bucket to the engine colocated with it
        (ipc). This rank's report (BucketSender.send; empty for a rank that sends nothing)."""
        with self._doing("send_weights"):
            sender = self._sender(timeout_s, transport)
            report = sender.send(self._weight_buckets_for(sender, bucket_bytes), engines, update_ids)
            self._sent[transport] = (bucket_bytes, self.actor.weights_revision)
            return report

    def _weight_buckets_for(self, sender, bucket_bytes: int):
        """The buckets `sender` sends (collective): every whole bucket on every rank, or this rank's own share."""
        if sender.whole_buckets_on_every_rank:
            return self._whole_buckets(bucket_bytes)
        return self.actor.owned_weight_buckets(bucket_bytes=bucket_bytes)

    def _whole_buckets(self, bucket_bytes: int):
        """Every whole bucket on every rank (collective), as views on the device the ranks exchange them on: the
        ipc sender packs each into its shared buffer before asking for the next."""
        return self.actor.export_hf_weights(bucket_bytes=bucket_bytes, dst=None, host_copies=False)

    def prepare_weights(self, bucket_bytes: int, timeout_s: float, transport: str) -> None:
        """An owner send's one-time set-up, done ahead of the first update (`ActorGroup.weight_owners`): the weight
        source's plan (collective; not for ipc, whose ranks export every bucket) and the sender, with their imports
        of vLLM's weight-transfer API."""
        with self._doing("prepare_weights"):
            inject("actor.prepare_weights", rank=self.rank)
            sender = self._sender(timeout_s, transport)
            if not sender.whole_buckets_on_every_rank:
                self.actor.weight_source(bucket_bytes=bucket_bytes)
            sender.load_backend()

    @ray.method(concurrency_group="weights")
    def conclude_weights(self, committed: bool, transport: str) -> None:
        sender = self.owner_senders.get(transport)
        if committed and transport in self._sent:
            self._committed[transport] = self._sent[transport]  # what a replay that exports again must find (ipc)
        if sender is not None:
            sender.conclude(committed)

    @ray.method(concurrency_group="weights")
    def replay_weights(self, engine, update_id: int, transport: str) -> int:
        """This owner's share of the last committed update over `transport` to a restarted engine (on its own thread:
        the rank may be training meanwhile; the buckets are the ones kept at commit, not the live weights). ipc keeps
        none: see `_replay_exported`."""
        sender = self.owner_senders.get(transport)
        if sender is None:
            return 0
        if sender.whole_buckets_on_every_rank:
            return self._replay_exported(sender, engine, update_id)
        return sender.replay(engine, update_id)

    @ray.method(concurrency_group="weights")
    def replay_refusal(self, transport: str) -> str | None:
        """Why this rank would refuse to replay the committed update over `transport` by exporting it again (ipc),
        or None. Asked of every rank before any enters the collective export (`ActorWeightOwners.replay`), so that
        one rank's refusal cannot leave the others waiting in it."""
        sender = self.owner_senders.get(transport)
        if sender is None or not sender.whole_buckets_on_every_rank:
            return None
        return self._exported_replay_refusal(sender.name)

    def _exported_replay_refusal(self, transport: str) -> str | None:
        if transport not in self._committed:
            return f"rank {self.rank}: no committed weight update to replay to a restarted engine"
        _, revision = self._committed[transport]
        if self.actor.weights_revision != revision:
            return (f"rank {self.rank}: cannot bring a restarted engine to the committed weights over ipc: the "
                    f"actor's weights changed since they were sent (revision {revision} -> "
                    f"{self.actor.weights_revision}) and ipc keeps no copy; send a new update (pool.update_weights) "
                    "instead")
        if self._running is not None:
            return (f"rank {self.rank}: cannot replay over ipc while {self._running[0]} runs: the export is "
                    "collective over the ranks")
        return None

    def _replay_exported(self, sender, engine, update_id: int) -> int:
        """The committed update exported again and sent to a restarted engine (ipc: collective over the ranks, on
        this thread). Refused unless the live weights are still the committed ones and the rank runs nothing else
        (in the colocated synchronous loop, the only mode ipc serves, an engine is restarted while the ranks wait);
        the group asks every rank first (`replay_refusal`), and this checks again."""
        refusal = self._exported_replay_refusal(sender.name)
        if refusal is not None:
            raise RuntimeError(refusal)
        bucket_bytes, _ = self._committed[sender.name]
        with self._doing("replay_weights"):
            return sender.replay(engine, update_id, self._whole_buckets(bucket_bytes))

    def _sender(self, timeout_s: float, transport: str):
        """This rank's sender of `transport`, made on first use (one per transport: pools of different transports
        served by one actor, e.g. `tools/benchmark.py refit --colocate`, keep their connections and kept buckets)."""
        if transport not in self.owner_senders:
            self.owner_senders[transport] = make_sender(transport, sender_id=f"actor{self.rank}", timeout_s=timeout_s)
        return self.owner_senders[transport]

    def shutdown(self) -> None:
        import torch.distributed as dist

        for sender in self.owner_senders.values():
            sender.close()
        if self.actor is not None:
            self.actor.shutdown()
        if dist.is_initialized():
            dist.destroy_process_group()


class ActorGroup:
    """`world_size` Megatron ranks as Ray actors (see the module docstring)."""

    def __init__(self, config: ActorConfig, world_size: int, *, device: str = "cpu", cpus_per_rank: int = 1,
                 threads_per_rank: int | None = None, timeout_s: float = 3600.0, env: dict[str, str] | None = None,
                 gpu_share: float = 1.0, collective_timeout_s: float = 1800.0, log_dir: str | None = None,
                 poll_s: float = 2.0):
        """timeout_s: the deadline of one call on all ranks (setup included); collective_timeout_s: torch.distributed's
        timeout of one collective; log_dir: where each rank's log goes (actor_rank<r>.log; None: Ray's logs only)."""
        from megatron_rl.cluster.placement import in_bundle, reserve_placement_group
        from megatron_rl.cluster.ray_cluster import require_ray

        require_ray()
        if not 0 < gpu_share <= 1:
            raise ValueError(f"gpu_share must be in (0, 1], got {gpu_share}")
        self.world_size = world_size
        self.timeout_s = timeout_s
        self.poll_s = poll_s
        self.workers = []
        self._weights_prepared: set[tuple[int, float, str]] = set()  # weight_owners' preparations started, for
        self._weights_preparing: list = []  # its refs, until a send has checked them
        self.log_paths = [os.path.join(log_dir, f"actor_rank{r}.log") if log_dir else None for r in range(world_size)]
        bundle = {"CPU": cpus_per_rank} if device == "cpu" else {"GPU": 1, "CPU": cpus_per_rank}
        self._pg = reserve_placement_group(
            [bundle] * world_size, "PACK", timeout_s, f"{world_size} actor rank(s)",
            "Start Ray with more resources or lower resources.actor_ranks / actor_cpus_per_rank",
        )
        worker_cls = ray.remote(concurrency_groups={"monitor": 1, "weights": 1})(_MegatronWorker)
        threads = threads_per_rank or cpus_per_rank
        self.threads_per_rank = threads
        base_env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads), **propagated_env(),
                    **(env or {})}
        self.workers = [
            worker_cls.options(
                num_cpus=cpus_per_rank, num_gpus=0 if device == "cpu" else gpu_share,
                scheduling_strategy=in_bundle(self._pg, rank),
            ).remote(rank, world_size, threads, base_env, self.log_paths[rank])
            for rank in range(world_size)
        ]
        try:
            addr, port = ray.get(self.workers[0].rendezvous_address.remote(), timeout=timeout_s)
            self.info = self._watch([w.setup.remote(config, addr, port, collective_timeout_s) for w in self.workers],
                                    "setup")
            self._nodes = {info["rank"]: (info["node"], info["pid"]) for info in self.info}
        except BaseException:
            self.shutdown(graceful=False)
            raise

    @property
    def placement_group(self):
        """The ranks' placement group (rank r in bundle r); colocated engines are placed in it too."""
        return self._pg

    def _watch(self, refs: list, what: str) -> list:
        """The results of one call on every rank (refs by rank), watching all ranks at once (module docstring)."""
        results: list[Any] = [None] * len(refs)
        pending = {ref: rank for rank, ref in enumerate(refs)}
        deadline = time.monotonic() + self.timeout_s
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._stuck(sorted(pending.values()), what)
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=min(self.poll_s, remaining))
            for ref in ready:
                rank = pending.pop(ref)
                results[rank] = self._result(rank, partial(ray.get, ref), what)
        return results

    def _result(self, rank: int, fetch, what: str):
        """fetch() of one rank's result, a dead rank or a raised error reported as a RankFailure."""
        try:
            return fetch()
        except ray.exceptions.RayActorError as error:
            raise self._failed(rank, what, "died", error) from None
        except ray.exceptions.RayTaskError as error:
            raise self._failed(rank, what, "raised", error) from error

    def _failed(self, rank: int, what: str, kind: str, error: BaseException) -> RankFailure:
        cause = str(getattr(error, "cause", None) or error).strip().splitlines()
        detail = "\n    ".join(cause[-6:])
        log = tail(self.log_paths[rank])
        where = self._where(rank)
        message = (f"Megatron rank {rank}{where} {kind} during {what}: {detail}" +
                   (f"\n  last lines of its log ({self.log_paths[rank]}):\n    " + log.replace("\n", "\n    ")
                    if log else ""))
        return RankFailure(message, ranks=[rank], kind=kind)

    def _where(self, rank: int) -> str:
        node = getattr(self, "_nodes", {}).get(rank)
        return f" (node {node[0]}, pid {node[1]})" if node else ""

    def _stuck(self, ranks: list[int], what: str) -> RankFailure:
        """A call past its deadline: what each unfinished rank is doing (its stack), read through the monitor."""
        lines = [f"{what} did not finish on rank(s) {ranks} within {self.timeout_s:g}s "
                 "(resources.actor_call_timeout_s); what each was doing:"]
        refs = {rank: self.workers[rank].status.remote() for rank in ranks}
        for rank, ref in refs.items():
            try:
                info = ray.get(ref, timeout=10)
                lines.append(f"  rank {rank} (node {info['node']}, pid {info['pid']}): {info['method']} for "
                             f"{info['running_s']:.0f}s, at:\n    " + info["stack"].replace("\n", "\n    "))
            except Exception as error:  # noqa: BLE001 - a rank that cannot even answer is reported as such
                lines.append(f"  rank {rank}: no answer ({type(error).__name__})")
            log = tail(self.log_paths[rank], 5)
            if log:
                lines.append("    last log lines: " + log.replace("\n", "\n      "))
        return RankFailure("\n".join(lines), ranks=ranks, kind="stuck")

    # ---- the actor's collective methods, typed ------------------------------------------------------------
    def compute_log_probs(self, batch: ActorBatch, *, model: str = "policy", with_entropy: bool = False,
                          record_routing: bool = False):
        """Per-sequence response log-probs under the policy or the KL reference (`MegatronActor.compute_log_probs`;
        record_routing: (log-probs, the routing that pass used) for routing replay R2)."""
        return self._call_all("compute_log_probs", batch, model=model, with_entropy=with_entropy,
                              record_routing=record_routing)[0]

    def train_step(self, batch: ActorBatch, *, objective: str = "policy", max_response_length: int | None = None,
                   lr: float | None = None, old_from_forward: bool = False) -> dict:
        """One optimizer step over the whole batch; the reduced metrics (`MegatronActor.train_step`; with
        old_from_forward also the forward's per-sequence log-probs under "log_probs")."""
        return self._call_all("train_step", batch, objective=objective, max_response_length=max_response_length,
                              lr=lr, old_from_forward=old_from_forward)[0]

    def set_threads(self, threads: int) -> None:
        """Every rank's torch threads from now on (threads_per_rank is what the group started with). Thread counts
        are a speed setting here, like resources.actor_threads_per_rank, which a resumed run may change."""
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self._watch([w.set_threads.remote(threads) for w in self.workers], "set_threads")

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
        """Call `MegatronActor.<method>(*args, **kwargs)` on every rank; the results, by rank (watched: _watch)."""
        args_ref = [ray.put(a) for a in args]  # one copy in the object store, not one per rank
        return self._watch([w.call.remote(method, *args_ref, **kwargs) for w in self.workers], method)

    def weight_buckets(self, bucket_bytes: int = 256 * 1024**2) -> Iterator[list]:
        """The model as buckets of full HF-named tensors, streamed from rank 0 while every rank takes part (watched
        like a call: a rank that dies or stalls during the export is reported, not waited for)."""
        streams = [w.weight_buckets.options(num_returns="streaming").remote(bucket_bytes) for w in self.workers]
        deadline = time.monotonic() + self.timeout_s
        active = dict(enumerate(streams))
        while active:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._stuck(sorted(active), "export_hf_weights")
            ready, _ = ray.wait(list(active.values()), num_returns=1, timeout=min(self.poll_s, remaining))
            for stream in ready:
                rank = next(r for r, s in active.items() if s is stream)
                try:
                    bucket = self._result(rank, lambda stream=stream: ray.get(next(stream)), "export_hf_weights")
                except StopIteration:
                    del active[rank]
                    continue
                if rank == 0:
                    yield bucket

    # ---- owner sends (docs/rollout.md, "Owner sends"): the pool's `WeightOwners` ----------------------------
    def weight_owners(self, bucket_bytes: int = 256 * 1024**2, timeout_s: float = 600.0,
                      transport: str = "gloo") -> "ActorWeightOwners":
        """This group's ranks as the senders of a weight update (`RolloutPool.sync_weights(group.weight_owners())`):
        each owner rank sends its own buckets straight to the engines. timeout_s: one engine's part of one bucket
        (rollout.weight_sync_timeout_s); transport: the pool's (rollout.transport: gloo, nccl on GPUs, or ipc with
        colocated engines).

        The first call (and one with a new bucket size or transport) also starts each rank's one-time preparation at
        once, without waiting for it (`_MegatronWorker.prepare_weights`): the pool then waits for engines that are still
        starting (the first sync of a run) while the ranks prepare, and the ranks' send runs after it (a Ray actor
        runs one caller's calls in order; `send` reports a failed preparation)."""
        if transport not in OWNER_TRANSPORTS:
            raise ValueError(f"owner sends go over {OWNER_TRANSPORTS}, not {transport!r} (rollout.transport)")
        if (bucket_bytes, timeout_s, transport) not in self._weights_prepared:
            self._weights_preparing = [w.prepare_weights.remote(bucket_bytes, timeout_s, transport)
                                       for w in self.workers]
            self._weights_prepared.add((bucket_bytes, timeout_s, transport))
        return ActorWeightOwners(self, bucket_bytes, timeout_s, transport)

    def weights(self, sender: str, bucket_bytes: int = 256 * 1024**2, timeout_s: float = 600.0,
                transport: str = "gloo"):
        """What a pool loads this group's weights from, by sender (`RolloutPoolConfig.resolved_weight_sender`):
        "owners" -> `weight_owners` (each owner rank sends its own share over `transport`), "driver" ->
        `weight_buckets` (rank 0's stream, sent by the pool's transport)."""
        if sender == "owners":
            return self.weight_owners(bucket_bytes, timeout_s, transport)
        if sender == "driver":
            return self.weight_buckets(bucket_bytes)
        raise ValueError(f"weight sender must be 'owners' or 'driver', got {sender!r}")

    def shutdown(self, graceful: bool = True) -> None:
        """Stop every rank: graceful asks each to leave torch.distributed first (60 s at most), then every actor is
        killed; graceful=False kills at once (after a failure the live ranks may be blocked in a collective)."""
        from ray.util.placement_group import remove_placement_group

        if graceful:
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


class ActorWeightOwners(WeightOwners):
    """The pool's `WeightOwners` (rollout/weight_transport.py) over an ActorGroup: the calls go to every rank and are
    watched like the group's other calls (a rank that dies or stalls is a RankFailure)."""

    def __init__(self, group: ActorGroup, bucket_bytes: int, timeout_s: float, transport: str):
        self.group, self.bucket_bytes, self.timeout_s = group, bucket_bytes, timeout_s
        self.transport = transport  # the ranks' senders: make_sender(transport)

    def send(self, engines: list, update_ids: list[int]) -> dict:
        """Every owner's share of one update to `engines`; the owners' reports merged: {"failed": {engine index:
        (kind, message)} (the first report per engine), "buckets", "tensors", "bytes"} summed over owners."""
        preparing, self.group._weights_preparing = self.group._weights_preparing, []
        if preparing:
            try:
                self.group._watch(preparing, "prepare_weights")
            except BaseException:
                self.group._weights_prepared.clear()  # the next weight_owners() prepares again
                raise
        engines_ref = ray.put(list(engines))
        ids = list(update_ids)
        sends = [w.send_weights.remote(engines_ref, self.bucket_bytes, self.timeout_s, ids, self.transport)
                 for w in self.group.workers]
        reports = self.group._watch(sends, "send_weights")
        merged = {"failed": {}, "buckets": 0, "tensors": 0, "bytes": 0}
        for report in reports:
            for index, failure in report["failed"].items():
                merged["failed"].setdefault(index, failure)
            for key in ("buckets", "tensors", "bytes"):
                merged[key] += report[key]
        return merged

    def conclude(self, committed: bool) -> None:
        self.group._watch([w.conclude_weights.remote(committed, self.transport) for w in self.group.workers],
                          "conclude_weights")

    def replay(self, engine, update_id: int) -> None:
        """Every owner's share of the committed update to one restarted engine. A transport that replays by exporting
        again (ipc: a collective over the ranks) first asks every rank whether it can, and raises the first refusal
        before any rank enters the export."""
        if TRANSPORTS[self.transport].whole_buckets_on_every_rank:
            refusals = self.group._watch([w.replay_refusal.remote(self.transport) for w in self.group.workers],
                                         "replay_refusal")
            refusal = next((r for r in refusals if r is not None), None)
            if refusal is not None:
                raise RuntimeError(refusal)
        self.group._watch([w.replay_weights.remote(engine, update_id, self.transport) for w in self.group.workers],
                          "replay_weights")
