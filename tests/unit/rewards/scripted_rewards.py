"""Reward functions for the pool tests, imported by the workers by path ("tests.unit.rewards.scripted_rewards:...").

``scripted_reward`` misbehaves on command (the response text says how) and otherwise is the real math reward,
so one pool covers ordinary answers, a sleep, a stuck call, exceptions, bad return values and a dying worker.
"""
import os
import signal
import time

from megatron_rl.rewards.math_reward import math_reward, warm_up

SLEEP = "<<sleep>>"        # interruptible: the worker's soft timeout ends it
STUCK = "<<stuck>>"        # SIGALRM blocked, as if stuck in C code: only the parent's hard kill ends it
RAISE = "<<raise>>"
RETURN_STRING = "<<return a string>>"
RETURN_NAN = "<<return nan>>"
SWALLOW = "<<swallow the timeout>>"  # catches Exception around a sleep: the timeout must still win
EXIT = "<<exit>>"          # the worker process dies


def scripted_reward(response, ground_truth):
    if response == SLEEP:
        time.sleep(60)
    if response == STUCK:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    if response == RAISE:
        raise RuntimeError("deliberate failure in a reward function")
    if response == RETURN_STRING:
        return "1.0"
    if response == RETURN_NAN:
        return float("nan")
    if response == SWALLOW:
        try:
            time.sleep(60)
        except Exception:  # noqa: BLE001 - what a careless reward does; SoftTimeout is a BaseException
            return 1.0
    if response == EXIT:
        os._exit(3)
    return math_reward(response, ground_truth)


scripted_reward.warmup = warm_up  # load sympy before the first timed call, as the built-in math reward does


def fields_reward(response, ground_truth, data_source, extra_info):
    """1.0 when the dataset fields arrive: data_source "src" and extra_info {"flag": True}."""
    return float(data_source == "src" and extra_info.get("flag") is True)


def scaled_reward(response, ground_truth, *, scale):
    return scale * float(response == ground_truth)


def one_argument_reward(response):
    return 0.0


not_a_function = 42


def reward_with_broken_warmup(response, ground_truth):
    return 0.0


def _broken_warmup():
    raise OSError("model file for the reward is missing")


reward_with_broken_warmup.warmup = _broken_warmup


def pid_reward(response, ground_truth):
    """The scoring process's pid (as a score), to see where an item was scored; in-process safe only for items whose
    data_source says "inline"."""
    if response == RAISE:
        raise RuntimeError("deliberate failure in a reward function")
    return float(os.getpid())


pid_reward.in_process_safe = lambda response, ground_truth, data_source="", extra_info=None: data_source == "inline"
