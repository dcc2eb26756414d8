"""Owner sends: each owner rank of the actor sends its own buckets straight to every rollout engine.

With `rollout.weight_sender: owners` no rank gathers the whole model and nothing passes through the driver: every
owner (actor/weight_source.py: the rank that holds a tensor first, one per PP stage / EP group) packs its own buckets
and broadcasts each to every engine through its own gloo group per engine (`megatron_rl_gloo`, the engine keeps one
group per sender). The choreography is vLLM's `nccl_m2n` one (every trainer rank sends its own shards) with vLLM's
dense-broadcast wire format, on gloo:

    driver:  engine.begin_weight_update(version) for every engine          (vLLM start_weight_update)
    owners:  per own bucket: engine.load_bucket(info) + broadcast, every engine in parallel   (update_weights)
    driver:  engine.finish_weight_update() where every bucket arrived, then commit / discard on the owners

An engine's calls run one at a time in arrival order and each call receives from the sender its info names, so the
owners need no order among themselves: whatever order an engine takes their buckets in, the sender of the bucket it
is in is already broadcasting it.

Failures: a broadcast that fails (the engine died, its `load_bucket` ended without receiving, or nothing arrived
within the timeout) marks that engine lost for the rest of this update; an engine that raised (a real error, e.g. a
name it does not know) is reported as such. The driver restarts lost engines and asks every owner to `replay` its
share of the last committed update to the new one. For that each owner keeps its committed buckets (packed, one
buffer per bucket): its share of the model in host memory, not the whole model on one rank.
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Iterable, Sequence

import torch

from megatron_rl.rollout.weight_transport import (
    LOST,
    RAISED,
    Bucket,
    GlooTransport,
    _EngineClient,
    _finished,
    is_engine_failure,
)

logger = logging.getLogger(__name__)


class OwnerSender:
    """One owner rank's sender: a `GlooTrainerWeightTransferEngine` per engine (connected on first use), the
    buckets of the open update and of the last committed one. name: this sender's name on the engines ("actor<r>").
    timeout_s: how long one engine's part of one bucket may take (`rollout.weight_sync_timeout_s`)."""

    def __init__(self, name: str, timeout_s: float = 600.0):
        self.name = name
        self.timeout_s = timeout_s
        self._senders: dict[Any, Any] = {}  # engine actor id -> GlooTrainerWeightTransferEngine
        self._pending: list[tuple[dict, torch.Tensor]] = []  # (update info, packed buffer) of the open update
        self._current: list[tuple[dict, torch.Tensor]] = []  # ... of the last committed update
        self._lock = threading.Lock()  # send (the actor's main thread) and replay (its weights thread) share senders
        self._threads = ThreadPoolExecutor(max_workers=32, thread_name_prefix=f"{name}-sender")  # one per engine

    def _connected(self, engine: Any):
        key = engine._actor_id
        with self._lock:
            sender = self._senders.get(key)
        if sender is None:
            import ray
            from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

            from megatron_rl.rollout.weight_transfer_engines import GlooTrainerInitInfo, register_backends

            register_backends()
            workers = ray.get(engine.num_workers.remote(), timeout=self.timeout_s)
            sender = WeightTransferTrainerFactory.trainer_init(
                GlooTrainerInitInfo(master_address=ray.util.get_node_ip_address(), num_workers=workers,
                                    timeout_s=self.timeout_s, sender=self.name, rank=0),
                client=_EngineClient(engine, self.timeout_s))
            with self._lock:
                self._senders[key] = sender
        return sender

    def _drop(self, engine: Any) -> None:
        with self._lock:
            sender = self._senders.pop(engine._actor_id, None)
        if sender is not None:
            sender.shutdown()

    def _send_to(self, engine: Any, info: dict, buffer: torch.Tensor) -> None:
        """One bucket to one engine: its `load_bucket(info)` while we broadcast, then its result (raises)."""
        import ray

        try:
            sender = self._connected(engine)
            ref = engine.load_bucket.remote(GlooTransport.name, info)
            try:
                sender.send_packed(buffer, partial(_finished, ref))
            except BaseException:
                if _finished(ref):
                    ray.get(ref, timeout=0)  # the engine's own error says why it did not receive
                raise
            ray.get(ref, timeout=self.timeout_s)
        except BaseException:
            self._drop(engine)
            raise

    def _send_bucket(self, info: dict, buffer: torch.Tensor, engines: dict[int, Any]) -> dict[int, tuple[str, str]]:
        """One bucket to these engines in parallel; {index: (LOST | RAISED, message)} of the ones that failed."""
        futures = {i: self._threads.submit(self._send_to, engine, info, buffer) for i, engine in engines.items()}
        failed = {}
        for i, future in futures.items():
            try:
                future.result()
            except Exception as error:  # noqa: BLE001 - reported to the driver, which restarts or fails the update
                kind = RAISED if _raised_by_engine(error) else LOST
                logger.warning("%s: weight transfer to engine %d failed (%s): %s", self.name, i, kind, error)
                failed[i] = (kind, f"{type(error).__name__}: {error}")
        return failed

    def send(self, buckets: Iterable[Bucket], engines: Sequence[Any]) -> dict[str, Any]:
        """This owner's part of one update: every non-empty bucket of `buckets` (the owner's own, see
        MegatronWeightSource.buckets; an iterator that must be driven to the end on every rank) to every engine.
        An engine that fails one bucket gets no more. Returns {"failed": {engine index: (kind, message)},
        "buckets", "tensors", "bytes"} (counts of this owner's share)."""
        from megatron_rl.rollout.weight_transfer_engines import pack_into_buffer, update_info

        self._pending = []
        failed: dict[int, tuple[str, str]] = {}
        counts = {"buckets": 0, "tensors": 0, "bytes": 0}
        for bucket in buckets:
            if not bucket:
                continue
            bucket = [(name, tensor.detach().to("cpu")) for name, tensor in bucket]
            info, buffer = update_info(bucket, self.name), pack_into_buffer([t for _, t in bucket])
            self._pending.append((info, buffer))
            counts["buckets"] += 1
            counts["tensors"] += len(bucket)
            counts["bytes"] += sum(t.numel() * t.element_size() for _, t in bucket)
            live = {i: engine for i, engine in enumerate(engines) if i not in failed}
            if live:
                failed.update(self._send_bucket(info, buffer, live))
        with self._lock:  # forget the connections of engines that are no longer in the pool
            keep = {engine._actor_id for engine in engines}
            stale = [key for key in self._senders if key not in keep]
            for key in stale:
                self._senders.pop(key).shutdown()
        return {"failed": failed, **counts}

    def conclude(self, committed: bool) -> None:
        """The open update completed (its buckets become the ones `replay` sends) or was abandoned."""
        if committed:
            self._current = self._pending
        self._pending = []

    def replay(self, engine: Any) -> int:
        """This owner's share of the last committed update to one (restarted) engine, between the driver's
        begin_weight_update and finish_weight_update on it. Raises on failure. Returns the number of buckets."""
        for info, buffer in self._current:
            self._send_to(engine, info, buffer)
        return len(self._current)

    def close(self) -> None:
        with self._lock:
            senders, self._senders = list(self._senders.values()), {}
        for sender in senders:
            sender.shutdown()
        self._threads.shutdown(wait=False)


def _raised_by_engine(error: BaseException) -> bool:
    """The engine's own call raised a real error (not: it is gone, or the transfer itself failed)."""
    from ray.exceptions import RayTaskError

    return isinstance(error, RayTaskError) and not is_engine_failure(error)
