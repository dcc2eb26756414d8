"""benchmarks/startup.py: the phases of a `megatron-rl train` run from its own timestamped lines."""
from megatron_rl.benchmarks.startup import phase_rows

LOG = [
    (3.0, "[train] run dir: /x/quickstart  (resolved config: /x/quickstart/config.yaml)"),
    (3.4, "[setup] making a random tiny qwen3 model in /x/tiny_model"),
    (7.0, "[setup] starting 1 vLLM engine(s) on cpu (weights over gloo, sent by the owners)"),
    (7.1, "[setup] starting 1 Megatron rank(s) (TP=1 x PP=1 x CP=1 x DP=1) from /x/tiny_model"),
    (11.5, "[warmup] 80 supervised steps of 32 examples (lr 0.003)"),
    (13.0, "[warmup] step 16/80: nll 0.721"),
    (17.0, "[warmup] step 80/80: nll 0.463"),
    (20.5, "[eval] step 0: accuracy 0.117 on 128 prompts (mean response length 4.0)"),
    (21.2, "step 1/3 | reward 0.107 acc 0.107 | 0.7s"),
    (21.5, "[checkpoint] step 1 saved to /x/checkpoints/step_000001 (0.3s)"),
    (22.2, "step 2/3 | reward 0.1 | 0.7s"),
    (22.4, "[checkpoint] step 2 saved to /x/checkpoints/step_000002 (0.2s)"),
    (23.1, "step 3/3 | reward 0.1 | 0.7s"),
    (23.3, "[checkpoint] step 3 saved to /x/checkpoints/step_000003 (0.2s)"),
    (25.0, "[train] done: eval/accuracy 0.156"),
]


def test_phases_are_the_gaps_between_the_trainers_lines():
    rows = {r["phase"]: r["seconds"] for r in phase_rows(LOG, exit_s=25.4)}
    assert rows["python start, imports, config load and check"] == 3.0
    assert rows["tiny model, data, reward workers, Ray start"] == 4.0
    assert rows["Megatron ranks start (engines start in the background)"] == 4.5
    assert rows["supervised warm-up (beside the starting engines)"] == 5.5  # "step 16/80" does not end it
    assert rows["first weight sync (waits for the engines) + first evaluation"] == 3.5
    assert rows["first RL step"] == 0.7
    assert rows["RL steps 2..3 (evaluations and checkpoints included)"] == 2.1  # to the last checkpoint
    assert rows["  of which checkpoint at step 1 (as printed)"] == 0.3
    assert rows["shutdown (engines, ranks, reward workers, Ray)"] == 1.7
    assert rows["process exit"] == 0.4 and rows["total (wall clock of the command)"] == 25.4
    parts = sum(s for p, s in rows.items() if not p.startswith(("  of which", "total")))
    assert abs(parts - 25.4) < 1e-6  # the phases tile the run


def test_a_missing_line_merges_its_phase_into_the_next():
    no_warmup = [(at, line) for at, line in LOG if not line.startswith("[warmup]")]
    phases = [r["phase"] for r in phase_rows(no_warmup, exit_s=25.4)]
    assert ("Megatron ranks start (engines start in the background) + supervised warm-up (beside the starting "
            "engines) + first weight sync (waits for the engines) + first evaluation") in phases


def test_a_silent_hung_command_is_killed_at_the_timeout(tmp_path):
    import sys
    import time

    import pytest

    from megatron_rl.benchmarks.startup import run_timestamped

    start = time.perf_counter()
    with pytest.raises(TimeoutError, match="ran past 1"):
        run_timestamped([sys.executable, "-c", "import time; time.sleep(60)"], str(tmp_path / "log"), timeout_s=1)
    assert time.perf_counter() - start < 30
    lines, _ = run_timestamped([sys.executable, "-c", "print('a'); print('b')"], str(tmp_path / "log2"))
    assert [line for _, line in lines] == ["a", "b"]
