"""RewardPool: scores in order, timeouts (soft and hard) and errors scored 0 and counted, workers replaced,
no orphan processes. One module-scoped pool (worker start-up costs ~0.5 s) runs the scripted reward."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from megatron_rl.rewards import RewardFunctionError, RewardItem, RewardPool, RewardPoolError
from tests.unit.rewards import scripted_rewards as scripted
from tests.unit.rewards.test_math_reward import ANSWER_TABLE

SCRIPTED = "tests.unit.rewards.scripted_rewards:scripted_reward"
TIMEOUT_S = 1.5
GRACE_S = 0.5


@pytest.fixture(scope="module")
def pool():
    with RewardPool(SCRIPTED, num_workers=2, timeout_s=TIMEOUT_S, kill_grace_s=GRACE_S) as reward_pool:
        yield reward_pool


def test_table_with_timeouts_and_errors_is_scored_and_counted(pool):
    """The answer table plus every failure mode, in one batch: each failure scores 0 and is counted."""
    table = [(response, truth) for response, truth, _ in ANSWER_TABLE]
    expected = [score for _, _, score in ANSWER_TABLE]
    failures = [
        # (item, counted as)
        ((scripted.SLEEP, "1"), "timeout"),                       # soft timeout in the worker
        (("\\boxed{9^{9^{9^{9}}}}", "3"), "timeout"),             # a real pathological answer: sympy never ends
        ((scripted.SWALLOW, "1"), "timeout"),                     # `except Exception` cannot swallow it
        ((scripted.STUCK, "1"), "timeout"),                       # hard kill + replacement
        ((scripted.RAISE, "1"), "error"),
        ((scripted.RETURN_STRING, "1"), "error"),
        ((scripted.RETURN_NAN, "1"), "error"),
        ((scripted.EXIT, "1"), "error"),                          # kills its worker, and the retry's
    ]
    items = table[:10] + [item for item, _ in failures] + table[10:]
    pids_before = set(pool.worker_pids)

    started = time.perf_counter()
    scores, metrics = pool.score(items)
    elapsed = time.perf_counter() - started

    assert scores == expected[:10] + [0.0] * len(failures) + expected[10:]
    assert metrics.num_items == len(items)
    assert metrics.num_timeouts == sum(kind == "timeout" for _, kind in failures) == 4
    assert metrics.num_errors == sum(kind == "error" for _, kind in failures) == 4
    assert metrics.num_worker_restarts == 3  # the stuck worker (killed), the exiting one and its retry
    assert metrics.mean_score == pytest.approx(sum(expected) / len(items))
    assert metrics.max_call_s >= TIMEOUT_S
    assert any("RuntimeError: deliberate failure" in m for m in metrics.problem_examples)
    assert any("worker process died twice on this item" in m for m in metrics.problem_examples)
    assert metrics.to_dict()["reward/num_timeouts"] == 4.0
    # The misbehaving calls would run 60 s (or forever); finishing far sooner proves they were cut at the
    # timeout. Loose bound: this machine is shared (2 cores), the expected time is ~5 s.
    assert elapsed < 30.0
    assert len(set(pool.worker_pids) - pids_before) in (2, 3)  # the retry may land on the first replacement
    assert not any(_running(pid) for pid in pids_before - set(pool.worker_pids))  # killed and reaped


def test_pool_keeps_working_after_failures_and_keeps_order(pool):
    items = [(f"Answer: {i}", str(i if i % 3 else i + 1)) for i in range(60)]
    scores, metrics = pool.score(items)
    assert scores == [0.0 if i % 3 == 0 else 1.0 for i in range(60)]
    assert metrics.num_timeouts == metrics.num_errors == metrics.num_worker_restarts == 0


def test_a_worker_killed_while_idle_is_replaced_without_losing_items(pool):
    victim = pool.worker_pids[0]
    print("DEBUG victim", victim, [(w.process.pid, w.ready, w.task) for w in pool._workers], file=sys.stderr)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _running(victim) and time.monotonic() < deadline:
        time.sleep(0.02)
    scores, metrics = pool.score([("Answer: 2", "2"), ("Answer: 3", "2"), ("Answer: 4", "4")])
    assert scores == [1.0, 0.0, 1.0], metrics
    assert metrics.num_worker_restarts == 1 and metrics.num_errors == 0 and metrics.num_timeouts == 0
    assert victim not in pool.worker_pids


def test_a_worker_that_cannot_start_is_a_pool_error_and_the_pool_closes():
    broken = RewardPool("tests.unit.rewards.scripted_rewards:reward_with_broken_warmup", num_workers=1)
    pids = broken.worker_pids
    with pytest.raises(RewardPoolError, match="(?s)could not load.*model file for the reward is missing"):
        broken.score([("a", "b")])
    assert not any(_running(pid) for pid in pids)
    with pytest.raises(RewardPoolError, match="after close"):
        broken.score([("a", "b")])


def test_empty_batch(pool):
    scores, metrics = pool.score([])
    assert scores == [] and metrics.num_items == 0


def test_bad_items_are_refused_before_scoring(pool):
    with pytest.raises(TypeError, match="reward item 1: response and ground_truth must be str"):
        pool.score([("a", "b"), RewardItem("a", None)])
    with pytest.raises(TypeError, match="reward item 0: a tuple must be"):
        pool.score([("a", "b", "c")])


def test_dataset_fields_reach_the_reward_function():
    with RewardPool("tests.unit.rewards.scripted_rewards:fields_reward", num_workers=1) as fields_pool:
        scores, _ = fields_pool.score([RewardItem("r", "g", "src", {"flag": True}), RewardItem("r", "g", "other", {}),
                                       RewardItem("r", "g", "src", None)])
    assert scores == [1.0, 0.0, 0.0]


def test_bad_spec_fails_before_any_worker_starts():
    children_before = psutil.Process().children()
    with pytest.raises(RewardFunctionError, match="cannot import module"):
        RewardPool("no_such_package.rewards:fn")
    assert psutil.Process().children() == children_before


@pytest.mark.parametrize("kwargs, message", [({"num_workers": 0}, "num_workers"), ({"timeout_s": 0}, "timeout_s"),
                                             ({"kill_grace_s": -1}, "kill_grace_s")])
def test_bad_settings_name_the_setting(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RewardPool("math", **kwargs)


def test_close_leaves_no_processes_and_refuses_more_work():
    reward_pool = RewardPool("math", num_workers=2)
    reward_pool.score([("Answer: 1", "1")])
    pids = reward_pool.worker_pids
    reward_pool.close()
    reward_pool.close()  # idempotent
    assert not any(psutil.pid_exists(pid) for pid in pids)
    with pytest.raises(RewardPoolError, match="after close"):
        reward_pool.score([("Answer: 1", "1")])


def test_workers_die_with_a_killed_parent():
    """A trainer killed with SIGKILL (no cleanup code runs) must not leave workers behind, even busy ones."""
    script = textwrap.dedent(f"""
        import sys, threading
        from megatron_rl.rewards import RewardPool
        pool = RewardPool({SCRIPTED!r}, num_workers=2, timeout_s=60)
        pool.score([("Answer: 1", "1")])
        print(*pool.worker_pids, flush=True)
        pool.score([({scripted.STUCK!r}, "1")])   # one worker busy and unreachable by signals when we die
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    pids = [int(pid) for pid in parent.stdout.readline().split()]
    assert len(pids) == 2
    time.sleep(0.3)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_running(pid) for pid in pids):
        time.sleep(0.05)
    assert not any(_running(pid) for pid in pids)


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_in_process_scoring_of_declared_safe_items():
    """Items the function declares safe (in_process_safe) are scored in this process, the rest in the workers; errors
    are still scored 0 and counted; with in_process="never" every item goes to a worker."""
    items = [RewardItem("a", "1", "inline"), RewardItem("b", "1", "math"), RewardItem(scripted.RAISE, "1", "inline"),
             RewardItem("c", "1", "inline")]
    with RewardPool("tests.unit.rewards.scripted_rewards:pid_reward", num_workers=1, timeout_s=5) as auto:
        scores, metrics = auto.score(items)
        assert scores[0] == scores[3] == os.getpid() and scores[2] == 0.0
        assert scores[1] == auto.worker_pids[0]
        assert metrics.num_items == 4 and metrics.num_errors == 1
    with RewardPool("tests.unit.rewards.scripted_rewards:pid_reward", num_workers=1, timeout_s=5,
                    in_process="never") as never:
        scores, metrics = never.score(items)
        assert scores[0] == scores[1] == scores[3] == never.worker_pids[0] != os.getpid()
        assert metrics.num_errors == 1
    with pytest.raises(ValueError, match="in_process must be 'auto' or 'never'"):
        RewardPool("tests.unit.rewards.scripted_rewards:pid_reward", in_process="sometimes")


def test_the_synthetic_verifiers_and_the_default_reward_declare_what_is_safe():
    from megatron_rl.rewards import resolve_reward_fn

    default = resolve_reward_fn("default")
    assert default.in_process_safe("Answer: 7", "7", "synthetic/arithmetic")
    assert not default.in_process_safe("\\boxed{7}", "7", "math_dapo")  # math-verify (sympy) stays in the workers
    assert resolve_reward_fn("countdown").in_process_safe("x", "y")
    assert not resolve_reward_fn("math").in_process_safe("x", "y")


def test_a_worker_killed_mid_batch_loses_no_item_and_scores_none_twice(monkeypatch):
    """Reward worker 0 is SIGKILLed (MEGATRON_RL_FAULTS, as the OOM killer would) at its 3rd item: the pool replaces
    it (the replacement is worker 1: ids are never reused), re-issues that item once, and every item is scored
    exactly once with the right score. One worker, so that worker 0 surely reaches its 3rd item (with two, the other
    one may take them all)."""
    items = [RewardItem(f"Answer: {i}", str(i)) for i in range(12)] + [RewardItem("Answer: 5", "4")]
    fault = '[{"point": "reward.score", "action": "kill", "rank": 0, "call": 3}]'
    monkeypatch.setenv("MEGATRON_RL_FAULTS", fault)
    with RewardPool("arithmetic", num_workers=1, timeout_s=5, in_process="never") as pool:
        scores, metrics = pool.score(items)
    assert scores == [1.0] * 12 + [0.0]
    assert metrics.num_worker_restarts == 1 and metrics.num_errors == 0 and metrics.num_items == 13
    assert metrics.score_sum == 12.0  # no item counted twice
