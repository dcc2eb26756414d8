"""The rollout producer's schedule (training/async_rollouts.py) with a fake `collect`: which weights version each batch
sees is decided by the trainer's allow / wait_generated calls, never by timing; failures reach the trainer; restored
batches are not generated again. Real engines and actors: tests/integration/test_train_async.py."""
import threading
import time

import pytest

from megatron_rl.faults import Fault, FaultInjected, inject, parse_faults
from megatron_rl.training.async_rollouts import RolloutProducer


class FakeWorld:
    """A weights version that the 'trainer' bumps, and a collect that records which version generated each batch."""

    def __init__(self, collect_seconds=0.0):
        self.version = 0
        self.seen = {}
        self.collect_seconds = collect_seconds
        self.lock = threading.Lock()

    def collect(self, step):
        with self.lock:
            version = self.version
        time.sleep(self.collect_seconds)
        self.seen[step] = version
        return f"batch {step} @ v{version}"


def _train_loop(world, producer, *, first, last, k, train_seconds=0.0):
    """The trainer's side of the schedule, as Trainer._loop / _rl_step_async drive it."""
    producer.allow(first + k)
    trained = []
    for step in range(first, last + 1):
        batch = producer.take(step, timeout=30)
        time.sleep(train_seconds)
        trained.append((step, batch, world.version))
        producer.wait_generated(step + k, timeout=30)
        with world.lock:
            world.version += 1  # the weight sync
        producer.allow(step + 1 + k)
    producer.stop(timeout=30)
    return trained


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("collect_seconds, train_seconds", [(0.0, 0.02), (0.02, 0.0)])  # slow actor / slow engine
def test_batch_u_is_generated_with_the_weights_after_step_u_minus_1_minus_k(k, collect_seconds, train_seconds):
    world = FakeWorld(collect_seconds)
    producer = RolloutProducer(world.collect, first=1, last=8)
    trained = _train_loop(world, producer, first=1, last=8, k=k, train_seconds=train_seconds)
    assert [s for s, _, _ in trained] == list(range(1, 9))
    assert world.seen == {u: max(0, u - 1 - k) for u in range(1, 9)}
    staleness = [version - world.seen[step] for step, _, version in trained]
    assert staleness == [min(step - 1, k) for step in range(1, 9)]


def test_restored_batches_are_not_generated_again_and_the_schedule_continues():
    world = FakeWorld()
    world.version = 5  # resumed after step 5 with batch 6 generated (k = 1)
    producer = RolloutProducer(world.collect, first=6, last=9, pending={6: "restored batch 6"})
    trained = _train_loop(world, producer, first=6, last=9, k=1)
    assert trained[0][1] == "restored batch 6"
    assert world.seen == {7: 5, 8: 6, 9: 7}  # batch u with the weights after step u - 2


def test_pending_is_what_a_checkpoint_saves():
    world = FakeWorld()
    producer = RolloutProducer(world.collect, first=1, last=5)
    producer.allow(2)
    producer.take(1, timeout=30)
    producer.wait_generated(2, timeout=30)
    assert producer.pending() == {2: "batch 2 @ v0"}
    producer.stop(timeout=30)


def test_a_failing_collect_reaches_the_trainer():
    def collect(step):
        if step == 2:
            raise ValueError("engine exploded")
        return step

    producer = RolloutProducer(collect, first=1, last=3)
    producer.allow(3)
    assert producer.take(1, timeout=30) == 1
    with pytest.raises(RuntimeError, match="failed while the trainer waited for batch 2") as error:
        producer.take(2, timeout=30)
    assert isinstance(error.value.__cause__, ValueError)


def test_nothing_is_generated_before_it_is_allowed_and_stop_ends_the_thread():
    world = FakeWorld()
    producer = RolloutProducer(world.collect, first=1, last=10)
    time.sleep(0.1)
    assert world.seen == {}
    with pytest.raises(TimeoutError):
        producer.take(1, timeout=0.2)
    producer.stop(timeout=5)
    assert not producer._thread.is_alive()


def test_fault_specs_are_parsed_and_checked(monkeypatch):
    assert parse_faults(None) == [] and parse_faults("") == []
    faults = parse_faults('[{"point": "engine.generate", "action": "delay", "seconds": 0.5, "rank": 1, "call": 2}]')
    assert faults == [Fault("engine.generate", "delay", 0.5, 1, 2)]
    for bad, message in (('{"point": "x"}', "JSON list"), ('[{"point": "x", "action": "explode"}]', "action must be"),
                         ('[{"point": "x", "action": "kill", "call": 0}]', "call counts from 1"), ("[", "not valid JSON")):
        with pytest.raises(ValueError, match=message):
            parse_faults(bad)


def test_a_raise_fault_fires_only_at_its_point_rank_and_call(monkeypatch):
    import megatron_rl.faults as faults

    monkeypatch.setattr(faults, "_faults", [Fault("actor.train_step", "raise", rank=1, call=2)])
    monkeypatch.setattr(faults, "_calls", faults.Counter())
    inject("actor.train_step", rank=1)  # call 1: nothing
    inject("engine.generate", rank=1)  # another point: nothing
    with pytest.raises(FaultInjected, match="actor.train_step"):
        inject("actor.train_step", rank=1)  # call 2
    inject("actor.train_step", rank=0)  # another rank: nothing
