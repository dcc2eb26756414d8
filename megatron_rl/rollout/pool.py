"""A pool of vLLM engines (Ray actors) that the trainer drives from global rank 0.

    start_local_ray_cluster(num_cpus=4)                     # or ray.init(address="auto") on a cluster
    pool = RolloutPool(RolloutPoolConfig(EngineConfig(model=hf_dir, dtype="float32"), num_engines=2))
    completions = pool.generate(prompt_token_ids, SamplingConfig(n=8, temperature=1.0, max_tokens=512, seed=step))
    stats = pool.update_weights(actor_group.weight_owners())       # each owner rank sends its own share
    stats = pool.update_weights(buckets)                             # or buckets of (hf_name, tensor) sent from here
    pool.shutdown()

generate: the prompts are split into one contiguous share per engine (all n samples of a prompt on one engine).
Each share must come back within `request_timeout_s`. An engine that dies (actor death, engine-core crash) or
hangs (timeout) is killed, restarted in its placement group, given the current weights (the senders of the last
committed update replay it), and its share is issued again, up to `max_attempts` tries per share. Results are checked
to hold every (prompt_index, sample_index) exactly once and returned in that order; a killed engine's late answer is
never read. Samples are reproducible whatever the pool size or retries (per-prompt seeds, see sharding.prompt_seed).

update_weights: every engine opens the update, the senders (`WeightOwners`: the actor's owner ranks, or this process
for a stream of buckets; rollout/weight_transport.py) send their buckets to every engine through the transport, the
engines load them in place (layerwise reload, see worker_extension.py), close the update and reset the prefix cache.
An update must hold every tensor of the model (checked per engine); an incomplete or interrupted one makes the pool
refuse to generate until a complete update arrives. An engine that dies during an update is restarted afterwards
and given the new weights by the senders' replay; an engine that raises fails the update with its error.

Placement: each engine gets its own placement group: on CPU one bundle {"CPU": cpus_per_engine}; on GPU
`tensor_parallel_size` bundles {"GPU": 1, "CPU": 1} packed on one node (STRICT_PACK), the engine actor in bundle 0
and, for TP > 1, vLLM's Ray executor placing the TP workers in the group. The GPU placement follows vLLM's RLHF
examples but has not been run here (no GPU in this environment).

Colocated (`config.colocate`, with `colocated_with=ColocatedPlacement` from the actor group): the engines reserve
nothing; engine e runs in the actor group's placement group in the bundles `colocated_with.engine_bundles[e]`, with
no CPU and, on GPU, `placement.COLOCATED_GPU_SHARE` of each bundle's GPU (TP > 1: vLLM's Ray executor gets the same
share and the bundle indices through VLLM_RAY_PER_WORKER_GPUS / VLLM_RAY_BUNDLE_INDICES). Memory hand-off, the order
of vLLM's RLHF colocate example: `sleep()` after the rollout (level 1: weights to CPU memory, KV cache freed), the
actors train, then `wake_up(("weights",))`, `update_weights(...)`, `wake_up(("kv_cache",))`. `generate` refuses while
anything is asleep and `update_weights` while the weights are. On CPU vLLM has no sleep mode: the engines skip the
vLLM calls (`PoolStats.vllm_sleep_calls` stays 0) but the pool runs the same protocol and records it
(`take_handoff_events`).
"""
from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from megatron_rl.rollout.config import RolloutPoolConfig
from megatron_rl.rollout.engine import RolloutEngine
from megatron_rl.cluster.placement import COLOCATED_GPU_SHARE, ColocatedPlacement, in_bundle, reserve_placement_group
from megatron_rl.cluster.ray_cluster import require_ray
from megatron_rl.rollout.sharding import assemble_completions, split_prompts
from megatron_rl.rollout.types import Completion, PoolStats, SamplingConfig, WeightSyncStats
from megatron_rl.rollout.weight_transport import (
    LOST,
    RAISED,
    Bucket,
    BucketSender,
    BucketStream,
    WeightOwners,
    is_engine_failure,
    make_sender,
)

logger = logging.getLogger(__name__)


class RolloutError(RuntimeError):
    """The pool cannot produce the requested rollouts (engines keep failing, cannot start, or weights are invalid)."""


@dataclass
class _Slot:
    engine_id: int
    actor: Any
    placement_group: Any
    owns_placement_group: bool = True  # False when colocated: the group is the actor group's


@dataclass
class _Share:
    prompt_indices: list[int]
    slot: int
    attempts: int = 0


def validate_prompts(prompts: Sequence[Sequence[int]], max_model_len: int | None, max_tokens: int) -> list[list[int]]:
    """Prompts as lists of ints; raises ValueError naming the first bad prompt before any engine is asked."""
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (str, bytes)):
            raise ValueError(f"prompts[{i}] is text; the pool takes token ids (tokenize with the model's tokenizer)")
        ids = list(prompt)
        if not ids:
            raise ValueError(f"prompts[{i}] is empty; every prompt needs at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids):
            raise ValueError(f"prompts[{i}] must hold non-negative int token ids")
        if max_model_len is not None and len(ids) + max_tokens > max_model_len:
            raise ValueError(
                f"prompts[{i}] has {len(ids)} tokens; with sampling.max_tokens={max_tokens} that exceeds "
                f"engine.max_model_len={max_model_len}: shorten the prompt, lower max_tokens or raise max_model_len"
            )
        out.append(ids)
    return out


def _serialized(method):
    """Run a pool method under the pool's lock: with asynchronous rollouts the trainer's generation thread and its
    main thread share the pool, and a weight update must land between two generation calls, never inside one."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return wrapper


class RolloutPool:
    """See the module docstring. Thread-safe: its public methods run one at a time (a lock), so a weight update
    never overlaps a `generate` call, and every completion of one call comes from one weights version."""

    def __init__(self, config: RolloutPoolConfig, *, colocated_with: ColocatedPlacement | None = None,
                 wait: bool = True):
        """wait=False returns once the engines are launched; the first call that needs them waits for their start
        (so a caller can set up other things meanwhile: the trainer starts the actors and runs the warm-up while the
        engines import vLLM and load the model, ~10 s on CPU)."""
        require_ray()
        if config.colocate != (colocated_with is not None):
            raise ValueError(
                f"rollout.colocate={config.colocate} but colocated_with is "
                f"{'set' if colocated_with is not None else 'None'}: a colocated pool needs the actor group's placement "
                "(ColocatedPlacement.on(group.placement_group, ...)), a split pool must not get one"
            )
        if colocated_with is not None and len(colocated_with.engine_bundles) != config.num_engines:
            raise ValueError(f"colocated_with places {len(colocated_with.engine_bundles)} engines, "
                             f"rollout.num_engines={config.num_engines}")
        self.config = config
        self.colocated_with = colocated_with
        self._lock = threading.RLock()
        self.stats = PoolStats()
        self._asleep: set[str] = set()  # memory tags the engines have released ("weights", "kv_cache")
        self._handoff_events: list[str] = []
        self._sender: BucketSender | None = None  # the driver's own sender, made for its first bucket stream
        self._owners: WeightOwners | None = None  # who sent the current weights (they replay them)
        self._version = 0
        self._invalid_reason: str | None = None
        self._slots: list[_Slot] = []
        self._starting = False
        try:
            self._slots = [self._spawn(i) for i in range(config.num_engines)]
            self._starting = True
            if wait:
                self.wait_started()
        except BaseException:
            self.shutdown()
            raise

    def wait_started(self) -> None:
        """Block until every engine launched by the constructor is up (no-op once they are)."""
        if self._starting:
            self._starting = False
            self._wait_started(self._slots)

    # ---- public API -------------------------------------------------------------------------------------------
    @property
    def num_engines(self) -> int:
        return len(self._slots)

    @property
    def weights_version(self) -> int:
        """0 before any update (the checkpoint), else the version of the last complete update."""
        return self._version

    def engine_handles(self) -> list[Any]:
        """The engines' current Ray actor handles, by engine id (diagnostics and fault-injection tests)."""
        return [slot.actor for slot in self._slots]

    @property
    def asleep(self) -> frozenset[str]:
        """The memory tags the engines have released (empty: fully awake)."""
        return frozenset(self._asleep)

    @_serialized
    def sleep(self, level: int = 1) -> None:
        """Colocated hand-off to the actors: every engine releases its GPU memory (vLLM sleep `level`: 1 offloads
        the weights to CPU memory and drops the KV cache; 2 drops both). See the module docstring."""
        if not self.config.colocate:
            raise RolloutError("sleep() is for colocated pools (rollout.colocate=true); a split pool keeps its GPUs")
        if level not in (1, 2):
            raise ValueError(f"level must be 1 (weights to CPU memory) or 2 (discard weights), got {level}")
        self._check_open()
        if self._asleep:
            raise RolloutError(f"the engines are already asleep ({sorted(self._asleep)}); wake_up() first")
        called = self._on_every_engine("sleep", level)
        self._asleep = {"weights", "kv_cache"}
        self.stats.sleeps += 1
        self.stats.vllm_sleep_calls += sum(bool(c) for c in called)
        self._handoff_events.append(f"sleep:{level}")

    @_serialized
    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Give the engines back the memory of `tags` (None: all). Weight sync needs "weights" awake, generation
        everything; vLLM's RLHF colocate order is wake_up(("weights",)), update_weights, wake_up(("kv_cache",))."""
        self._check_open()
        tags = ("weights", "kv_cache") if tags is None else tuple(tags)
        unknown = [t for t in tags if t not in ("weights", "kv_cache")]
        if unknown or not tags:
            raise ValueError(f"tags must be a non-empty subset of ('weights', 'kv_cache'), got {tags}")
        asleep = [t for t in tags if t in self._asleep]
        if not asleep:
            raise RolloutError(f"wake_up({tags}): nothing of that is asleep (asleep: {sorted(self._asleep)})")
        self._on_every_engine("wake_up", asleep)
        self._asleep -= set(asleep)
        self.stats.wakes += 1
        self._handoff_events.append("wake:" + ",".join(asleep))

    def yield_to_training(self) -> None:
        """The rollout is done: a colocated pool hands the memory to the actors (`sleep(level=1)`); a split pool keeps
        its devices (nothing to do). `sync_weights` hands it back. The trainer calls both every step, whatever the
        mode, so the hand-off protocol lives here and not in the loop."""
        if self.config.colocate:
            self.sleep(level=1)

    @_serialized
    def sync_weights(self, weights: Iterable[Bucket] | WeightOwners, *, version: int | None = None
                     ) -> WeightSyncStats:
        """`update_weights` with a colocated pool's hand-back around it, in vLLM's RLHF colocate order: wake the
        weights, load the new ones, then wake the KV cache. For a split pool (or an awake one) just `update_weights`."""
        if "weights" in self._asleep:
            self.wake_up(("weights",))
        stats = self.update_weights(weights, version=version)
        if self._asleep:
            self.wake_up(("kv_cache",))
        return stats

    def take_handoff_events(self) -> list[str]:
        """The colocated pool's sleep / wake / weight-update events since the last call, in order (the trainer logs
        them per step as colocate/handoff); always empty for a split pool."""
        events, self._handoff_events = self._handoff_events, []
        return events

    @_serialized
    def engine_info(self) -> list[dict[str, Any]]:
        import ray

        return ray.get([slot.actor.info.remote() for slot in self._slots], timeout=self.config.request_timeout_s)

    @_serialized
    def generate(
        self, prompts: Sequence[Sequence[int]], sampling: SamplingConfig, *, timeout_s: float | None = None
    ) -> list[Completion]:
        """n completions per prompt (token ids), ordered by (prompt_index, sample_index).

        timeout_s: per-share time limit for this call (default: rollout.request_timeout_s), e.g. longer for an
        evaluation with long answers."""
        import ray

        self._check_usable()
        if not isinstance(sampling, SamplingConfig):
            raise TypeError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
        timeout_s = self.config.request_timeout_s if timeout_s is None else float(timeout_s)
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        prompts = validate_prompts(prompts, self.config.engine.max_model_len, sampling.max_tokens)
        if not prompts:
            return []
        start = time.perf_counter()
        shares = [_Share(indices, slot) for slot, indices in enumerate(split_prompts(len(prompts), self.num_engines))]
        inflight: dict[Any, tuple[_Share, float]] = {}

        def issue(share: _Share) -> None:
            if share.attempts >= self.config.max_attempts:
                raise RolloutError(
                    f"prompts {share.prompt_indices[0]}..{share.prompt_indices[-1]} failed {share.attempts} times "
                    f"(last on engine {share.slot}); see the log for each failure (rollout.max_attempts="
                    f"{self.config.max_attempts})"
                )
            share.attempts += 1
            if share.attempts > 1:
                self.stats.reissued_shares += 1
            requests = [(i, prompts[i]) for i in share.prompt_indices]
            ref = self._slots[share.slot].actor.generate.remote(requests, sampling)
            inflight[ref] = (share, time.monotonic() + timeout_s)

        for share in shares:
            issue(share)
        results: list[Completion] = []
        while inflight:
            earliest = min(deadline for _, deadline in inflight.values())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=max(0.0, earliest - time.monotonic()))
            if not ready:  # the earliest deadline passed: replace the engines that are still busy past theirs
                _, pending = ray.wait(list(inflight), num_returns=len(inflight), timeout=0)
                now = time.monotonic()
                for ref in pending:
                    share, deadline = inflight[ref]
                    if deadline <= now:
                        del inflight[ref]
                        self.stats.timeouts += 1
                        self._restart(share.slot, f"no answer within {timeout_s}s")
                        issue(share)
                continue
            ref = ready[0]
            share, _ = inflight.pop(ref)
            try:
                results.extend(ray.get(ref))
            except Exception as error:  # noqa: BLE001 - sorted into engine failures and real errors below
                if not is_engine_failure(error):
                    raise
                self.stats.engine_failures += 1
                self._restart(share.slot, f"failed: {type(error).__name__}: {error}")
                issue(share)
        elapsed = time.perf_counter() - start
        completions = assemble_completions(results, len(prompts), sampling.n)
        for c in completions:
            c.timings["pool_generate_s"] = elapsed
            c.weights_version = self._version  # the lock keeps it the version of every engine for the whole call
        return completions

    @_serialized
    def update_weights(self, weights: Iterable[Bucket] | WeightOwners, *, version: int | None = None
                       ) -> WeightSyncStats:
        """Load a complete set of HF-named weights into every engine (in place): `weights` is either the buckets
        (lists of (hf_name, tensor)), sent from here by the pool's transport, or the trainer's `WeightOwners`, which
        send their own buckets straight to the engines (owner sends; rollout/weight_transport.py)."""
        import ray

        self._check_open()
        if "weights" in self._asleep:
            raise RolloutError("update_weights while the engines' weights are asleep: call wake_up(('weights',)) first")
        version = self._version + 1 if version is None else int(version)
        if version <= self._version:
            raise ValueError(f"version must increase: got {version}, current weights are version {self._version}")
        start = time.perf_counter()
        owners = weights if isinstance(weights, WeightOwners) else BucketStream(weights, self._driver_sender())
        failed, counts = self._send(owners, version)
        finishes = {i: slot.actor.finish_weight_update.remote() for i, slot in enumerate(self._slots)
                    if i not in failed}

        deadline = time.monotonic() + self.config.weight_sync_timeout_s
        engine_seconds: dict[int, float] = {}
        lost: list[tuple[int, str]] = []
        update_errors: list[str] = []
        for i, (kind, why) in sorted(failed.items()):
            if kind == RAISED:
                update_errors.append(f"engine {i}: {why}")
            else:
                lost.append((i, why))
        for i, ref in finishes.items():
            try:
                finished = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
                engine_seconds[self._slots[i].engine_id] = finished["seconds"]
            except Exception as error:  # noqa: BLE001 - sorted below
                if isinstance(error, ray.exceptions.GetTimeoutError):
                    limit = self.config.weight_sync_timeout_s
                    lost.append((i, f"weight update not done within weight_sync_timeout_s={limit}"))
                elif is_engine_failure(error):
                    self.stats.engine_failures += 1
                    lost.append((i, f"died during the weight update: {type(error).__name__}"))
                else:
                    update_errors.append(f"engine {i}: {error}")
        committed = not update_errors and len(lost) < len(self._slots)
        owners.conclude(committed)
        if committed:
            self._owners = owners
        else:
            self._invalid_reason = f"weight update {version} failed"
            # an engine that raised may still hold the update open (a finish closes the others'): close it
            self._abort_open_updates([i for i, (kind, _) in failed.items() if kind == RAISED])
            for i, reason in lost:
                self._restart(i, reason, replay=False)
            raise RolloutError(
                f"weight update {version} failed; the pool will not generate until a complete update succeeds. "
                f"Errors: {update_errors or [reason for _, reason in lost]}"
            )
        self._version = version
        self._invalid_reason = None
        if self.config.colocate:
            self._handoff_events.append(f"update_weights:{version}")
        for i, reason in lost:  # the surviving engines have the new weights; the restarted ones get them by replay
            self._restart(i, reason)
        return WeightSyncStats(
            version=version,
            num_buckets=counts["buckets"],
            num_tensors=counts["tensors"],
            num_bytes=counts["bytes"],
            seconds=time.perf_counter() - start,
            engine_seconds=engine_seconds,
            restarted_engines=[self._slots[i].engine_id for i, _ in lost],
        )

    def _send(self, owners: WeightOwners, version: int) -> tuple[dict[int, tuple[str, str]], dict[str, int]]:
        """Every engine opens the update, then the owners send their buckets to the engines that did; ({engine
        index: (LOST | RAISED, why)} of the engines that failed, the counts of what was sent)."""
        import ray

        if owners.transport != self.config.transport:
            raise RolloutError(f"these weights are sent over {owners.transport!r}, but the engines run the "
                               f"{self.config.transport!r} backend (rollout.transport)")
        begun = {i: slot.actor.begin_weight_update.remote(version) for i, slot in enumerate(self._slots)}
        failed: dict[int, tuple[str, str]] = {}
        update_ids: dict[int, int] = {}  # what each engine's begin returned; every bucket to it names it
        deadline = time.monotonic() + self.config.weight_sync_timeout_s
        for i, ref in begun.items():
            try:
                update_ids[i] = ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except Exception as error:  # noqa: BLE001 - this engine cannot take the update
                gone = is_engine_failure(error) or isinstance(error, ray.exceptions.GetTimeoutError)
                failed[i] = (LOST if gone else RAISED, f"begin_weight_update: {type(error).__name__}: {error}")
        live = [slot.actor for i, slot in enumerate(self._slots) if i not in failed]
        index = [i for i in range(len(self._slots)) if i not in failed]
        try:
            report = owners.send(live, [update_ids[i] for i in index])
        except BaseException:
            try:
                owners.conclude(False)
            except Exception as error:  # noqa: BLE001 - the send's own error is the one to report
                logger.warning("weight owners could not discard the failed update: %s", error)
            self._invalid_reason = "an update_weights call was interrupted while sending"
            self._abort_open_updates()
            raise
        for j, failure in report["failed"].items():
            failed[index[int(j)]] = tuple(failure)
        return failed, {key: report[key] for key in ("buckets", "tensors", "bytes")}

    @_serialized
    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Stop every engine cleanly (vLLM shutdown, then the actor and its placement group). Idempotent."""
        import ray
        from ray.util.placement_group import remove_placement_group

        slots, self._slots = self._slots, []
        pending = {}
        for slot in slots:
            if slot.actor is not None:
                pending[slot.engine_id] = slot.actor.shutdown.remote()
        for engine_id, ref in pending.items():
            try:
                ray.get(ref, timeout=timeout_s)
            except Exception as error:  # noqa: BLE001 - a dead engine has nothing left to shut down
                logger.warning("engine %d did not shut down cleanly: %s", engine_id, error)
        for slot in slots:
            if slot.actor is not None:
                ray.kill(slot.actor, no_restart=True)
            if slot.placement_group is not None and slot.owns_placement_group:
                remove_placement_group(slot.placement_group)
        if self._sender is not None:
            self._sender.close()
        self._invalid_reason = "the pool was shut down"

    def _driver_sender(self) -> BucketSender:
        """The sender of weights streamed from this process (made on first use: with owner sends the driver sends
        nothing, and an nccl sender needs a GPU in this process)."""
        if self._sender is None:
            self._sender = make_sender(self.config.transport, timeout_s=self.config.weight_sync_timeout_s)
        return self._sender

    def __enter__(self) -> "RolloutPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    # ---- engines ----------------------------------------------------------------------------------------------
    def _bundles(self) -> list[dict[str, float]]:
        engine = self.config.engine
        if self.config.device == "cpu":
            return [{"CPU": float(engine.cpus_per_engine)}]
        return [{"GPU": 1.0, "CPU": 1.0} for _ in range(engine.tensor_parallel_size)]

    def _actor_resources(self) -> dict[str, float]:
        engine = self.config.engine
        if self.config.colocate:  # placement.py: no CPU; a share of the actor rank's GPU (vLLM's workers for TP > 1)
            gpus = COLOCATED_GPU_SHARE if self.config.device == "gpu" and engine.tensor_parallel_size == 1 else 0
            return {"num_cpus": 0, "num_gpus": gpus}
        if self.config.device == "cpu":
            return {"num_cpus": engine.cpus_per_engine, "num_gpus": 0}
        if engine.tensor_parallel_size == 1:
            return {"num_cpus": 1, "num_gpus": 1}
        return {"num_cpus": 0, "num_gpus": 0}  # vLLM's Ray executor takes the GPU bundles for its TP workers

    def _process_env(self, engine_id: int) -> dict[str, str]:
        env = dict(self.config.engine.process_env(self.config.device))
        if self.config.colocate and self.config.device == "gpu" and self.config.engine.tensor_parallel_size > 1:
            # vLLM's Ray executor: each TP worker takes this GPU share, in these bundles of the captured group
            env["VLLM_RAY_PER_WORKER_GPUS"] = str(COLOCATED_GPU_SHARE)
            env["VLLM_RAY_BUNDLE_INDICES"] = ",".join(map(str, self.colocated_with.engine_bundles[engine_id]))
        return env

    def _spawn(self, engine_id: int, placement_group: Any = None) -> _Slot:
        import ray

        owns = self.colocated_with is None
        bundle_index = 0 if owns else self.colocated_with.engine_bundles[engine_id][0]
        if placement_group is None:
            if owns:
                try:
                    placement_group = reserve_placement_group(
                        self._bundles(), "STRICT_PACK", self.config.startup_timeout_s, f"engine {engine_id}",
                        "Start Ray with more resources or lower rollout.num_engines / engine.cpus_per_engine",
                    )
                except RuntimeError as error:
                    raise RolloutError(str(error)) from None
            else:
                placement_group = self.colocated_with.placement_group
        options = dict(
            scheduling_strategy=in_bundle(placement_group, bundle_index, capture_child_tasks=True),
            runtime_env={"env_vars": self._process_env(engine_id)},
            max_restarts=0,  # the pool restarts engines itself, with the current weights
            max_concurrency=1,
            **self._actor_resources(),
        )
        actor = ray.remote(RolloutEngine).options(**options).remote(
            engine_id, self.config.engine, self.config.device, self.config.colocate, self.config.transport)
        return _Slot(engine_id, actor, placement_group, owns)

    def _wait_started(self, slots: Sequence[_Slot]) -> None:
        import ray

        refs = [slot.actor.info.remote() for slot in slots]
        try:
            infos = ray.get(refs, timeout=self.config.startup_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RolloutError(
                f"engines did not start within rollout.startup_timeout_s={self.config.startup_timeout_s}"
            ) from None
        for info in infos:
            logger.info(
                "rollout engine %d started in %.1fs (pid %d)", info["engine_id"], info["startup_s"], info["pid"]
            )

    def _restart(self, index: int, reason: str, *, replay: bool = True) -> None:
        """Replace engine `index` (kill, start in the same placement group, load the current weights)."""
        import ray

        slot = self._slots[index]
        logger.warning("rollout engine %d %s; restarting it", slot.engine_id, reason)
        if self._sender is not None:
            self._sender.forget(slot.actor)
        try:
            ray.kill(slot.actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already gone
            pass
        new = self._spawn(slot.engine_id, slot.placement_group)
        self._slots[index] = new
        self.stats.restarts += 1
        try:
            ray.get(new.actor.info.remote(), timeout=self.config.startup_timeout_s)
            if replay and self._owners is not None:  # the senders of the current weights replay them
                update_id = ray.get(new.actor.begin_weight_update.remote(self._version),
                                    timeout=self.config.weight_sync_timeout_s)
                self._owners.replay(new.actor, update_id)
                ray.get(new.actor.finish_weight_update.remote(), timeout=self.config.weight_sync_timeout_s)
        except Exception as error:  # noqa: BLE001 - the pool cannot go on without this engine
            # the new engine holds the weights it started from (or half a replay): it must not serve until a complete
            # update, which must find no update of the replay still open there
            self._invalid_reason = f"engine {slot.engine_id} was restarted without the current weights"
            self._abort_open_updates([index])
            raise RolloutError(f"engine {slot.engine_id} could not be restarted ({reason}): {error}") from error

    def _abort_open_updates(self, indices: Sequence[int] | None = None) -> None:
        """Close the open weight updates of these engines (default: all) after a failed update (best effort)."""
        import ray

        slots = self._slots if indices is None else [self._slots[i] for i in indices]
        refs = [slot.actor.abort_weight_update.remote() for slot in slots]
        for slot, ref in zip(slots, refs):
            try:
                ray.get(ref, timeout=self.config.weight_sync_timeout_s)
            except Exception as error:  # noqa: BLE001 - such an engine is replaced at the next failure it causes
                logger.warning("engine %d: aborting its weight update failed: %s", slot.engine_id, error)

    def _on_every_engine(self, method: str, *args) -> list[Any]:
        import ray

        refs = [getattr(slot.actor, method).remote(*args) for slot in self._slots]
        try:
            return ray.get(refs, timeout=self.config.weight_sync_timeout_s)
        except Exception as error:  # noqa: BLE001 - a failed hand-off leaves memory in an unknown state
            raise RolloutError(f"engine {method}({', '.join(map(repr, args))}) failed: {error}") from error

    def _check_open(self) -> None:
        if not self._slots:
            raise RolloutError("the pool was shut down")
        self.wait_started()

    def _check_usable(self) -> None:
        self._check_open()
        if self._asleep:
            raise RolloutError(f"the engines are asleep ({sorted(self._asleep)}); call wake_up() before generating")
        if self._invalid_reason is not None:
            raise RolloutError(
                f"{self._invalid_reason}; the engines' weights are undefined until update_weights completes"
            )
