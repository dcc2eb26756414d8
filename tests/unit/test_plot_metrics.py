"""tools/plot_metrics.py: reading metrics.jsonl, series, smoothing by steps, seed aggregation, the PNG and the CLI;
and examples/length_dynamics/run.py, whose numbers and plots are built on it."""
import importlib.util
import json
import os

import pytest

REPO = os.path.join(os.path.dirname(__file__), "..", "..")


def load_script(relative_path: str, name: str):
    """A repository script (tools/*.py, examples/**/*.py: not importable as a package) loaded as module `name`."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, relative_path))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pm():
    return load_script("tools/plot_metrics.py", "plot_metrics")


def write_run(folder, records, extra_lines=()):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line)
    return str(folder)


def rl_records(steps, length, acc, responses=16, eval_every=10):
    out = [{"step": 0, "eval/accuracy": acc(0)}]
    for s in range(1, steps + 1):
        r = {"step": s, "rollout/response_length_mean": length(s), "rollout/accuracy": acc(s),
             "sampling/responses_generated": responses}
        if s % eval_every == 0:
            r["eval/accuracy"] = acc(s)
        out.append(r)
    return out


def test_read_records_skips_torn_lines_and_keeps_the_last_duplicate(pm, tmp_path):
    run = write_run(tmp_path / "r", [{"step": 1, "x": 1.0}, {"step": 2, "x": 2.0}, {"step": 2, "x": 5.0}],
                    extra_lines=['{"step": 3, "x": 3'])  # cut by a crash
    records = pm.read_records(run)
    assert [r["step"] for r in records] == [1, 2]
    assert records[1]["x"] == 5.0  # a resumed run rewrote step 2
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        pm.read_records(str(tmp_path / "nowhere"))


def test_series_by_step_and_by_running_total(pm):
    records = [{"step": 1, "y": 1.0, "n": 8}, {"step": 2, "n": 16}, {"step": 3, "y": float("nan"), "n": 8},
               {"step": 4, "y": 4.0, "n": 8}]
    assert pm.series(records, "y") == ([1.0, 4.0], [1.0, 4.0], [1, 4])  # NaN and missing values left out
    xs, ys, steps = pm.series(records, "y", "n")
    assert xs == [8.0, 40.0] and ys == [1.0, 4.0] and steps == [1, 4]  # step 2's 16 still counts in the total


def test_smooth_is_a_trailing_window_in_steps(pm):
    assert pm.smooth([1, 2, 3, 4], [1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert pm.smooth([1, 2, 3], [1, 2, 3], 1) == [1, 2, 3]
    # points every 10 steps are not averaged together by a 5-step window
    assert pm.smooth([0.2, 0.4, 0.9], [0, 10, 20], 5) == [0.2, 0.4, 0.9]


def test_aggregate_same_steps_and_interpolated_totals(pm):
    xs, mean, low, high = pm.aggregate([([1, 2, 3], [0.0, 1.0, 2.0]), ([1, 2, 3], [2.0, 3.0, 4.0])])
    assert xs == [1, 2, 3] and mean == [1.0, 2.0, 3.0] and low == [0.0, 1.0, 2.0] and high == [2.0, 3.0, 4.0]
    # different x (running totals): interpolated onto the union inside the common range [10, 30]
    xs, mean, low, high = pm.aggregate([([0, 20, 40], [0.0, 2.0, 4.0]), ([10, 30], [1.0, 3.0])])
    assert xs == [10.0, 20.0, 30.0]
    assert mean == pytest.approx([1.0, 2.0, 3.0])  # y = x / 10 on both seeds
    assert pm.aggregate([([0, 1], [0, 1]), ([5, 6], [0, 1])]) == ([], [], [], [])


def test_plot_writes_a_png_with_seed_means_and_reports_missing_keys(pm, tmp_path):
    a0 = write_run(tmp_path / "a0", rl_records(20, lambda s: 10 + s, lambda s: 0.5))
    a1 = write_run(tmp_path / "a1", rl_records(20, lambda s: 20 + s, lambda s: 0.7))
    b0 = write_run(tmp_path / "b0", rl_records(20, lambda s: 5.0, lambda s: 0.1))
    out = tmp_path / "plots" / "curves.png"
    summary = pm.plot([("A", a0), ("A", a1), ("B", b0)], str(out),
                      keys=["rollout/response_length_mean", "eval/accuracy", "never/logged"])
    with open(out, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert summary["final"]["A"]["rollout/response_length_mean"] == pytest.approx(35.0)  # mean of 30 and 40
    assert summary["final"]["A"]["eval/accuracy"] == pytest.approx(0.6)
    assert summary["final"]["B"]["rollout/response_length_mean"] == 5.0
    assert sorted(label for label, _, key in summary["missing"] if key == "never/logged") == ["A", "A", "B"]


def test_cli(pm, tmp_path, capsys):
    run = write_run(tmp_path / "run1", rl_records(5, lambda s: s, lambda s: 0.5))
    out = tmp_path / "x.png"
    assert pm.main([run, "--out", str(out), "--smooth", "2", "--x", "sampling/responses_generated"]) == 0
    assert out.exists()
    assert pm.main(["--run", "no-equals-sign", "--out", str(out)]) == 2
    assert "LABEL=PATH" in capsys.readouterr().err
    assert pm.main([]) == 2
    assert pm.main([run, "--smooth", "0"]) == 2


# ---- examples/length_dynamics/run.py: the numbers and plots of the miniature are built on this tool ---------------
@pytest.fixture(scope="module")
def ld():
    return load_script("examples/length_dynamics/run.py", "length_dynamics_run")


def ld_records(steps, length, acc, responses=16):
    """A finished RL run as the trainer logs it (time/step marks an RL step; eval every 10 steps)."""
    return [{"step": 0, "eval/accuracy": acc(0)}] + [
        {"step": s, "time/step": 1.0, "rollout/response_length_mean": length(s), "rollout/accuracy": acc(s),
         "sampling/responses_generated": responses, **({"eval/accuracy": acc(s)} if s % 10 == 0 else {})}
        for s in range(1, steps + 1)]


def test_length_dynamics_first_reaching_uses_a_trailing_mean(ld):
    xs = list(range(1, 13))
    assert ld._first_reaching(xs, [0.0] * 9 + [10.0] * 3, 1.0) == 10  # mean of the first 10 points = 1.0
    assert ld._first_reaching(xs, [0.0] * 12, 1.0) is None
    assert ld._first_reaching(xs[:5], [9.0] * 5, 1.0) is None  # fewer points than the window


def test_length_dynamics_run_numbers(ld):
    numbers = ld.run_numbers(ld_records(30, lambda s: 10.0 + s, lambda s: min(1.0, 0.03 * s)))
    assert numbers["rollout_length_first5"] == 13.0 and numbers["rollout_length_steps11_30"] == 30.5
    assert numbers["step_length_20"] == 15  # the mean of 10 + s over s-9..s is 5.5 + s: >= 20 from s = 15
    assert numbers["responses_generated"] == 30 * 16
    assert numbers["responses_to_acc_0.6"] == 25 * 16  # mean of 0.03 s over s-9..s reaches 0.6 at s = 25
    assert numbers["eval_accuracy_start"] == 0.0 and numbers["eval_accuracy_end"] == pytest.approx(0.9)


def test_length_dynamics_plots_and_summary_from_finished_runs(ld, tmp_path):
    """--plots-only on two methods x two seeds: the PNGs, summary.md (means, never-reached, paired by seed) and
    summary.json; an unfinished run is refused, not summarised."""
    runs, out = tmp_path / "runs", tmp_path / "out"
    for seed in (0, 1):
        write_run(runs / f"luspo_s{seed}", ld_records(30, lambda s: 10.0 + s + seed, lambda s: min(1.0, 0.03 * s)))
        write_run(runs / f"gspo_s{seed}", ld_records(30, lambda s: 10.0 + seed, lambda s: 0.5))
    argv = ["--plots-only", "--runs-dir", str(runs), "--out", str(out), "--seeds", "0,1", "--methods", "gspo,luspo",
            "--steps", "30"]
    assert ld.main(argv) == 0
    for name in ("length.png", "accuracy.png", "sample_efficiency.png", "diagnostics.png", "ablation.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
    summary = (out / "summary.md").read_text()
    assert "| GSPO | 2 |" in summary and "| LUSPO | 2 |" in summary
    lines = summary.splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| method |")).strip("|").split("|")]
    table = {cells[0]: dict(zip(header, cells)) for cells in (
        [c.strip() for c in x.strip("|").split("|")] for x in lines if x.startswith(("| GSPO | 2", "| LUSPO | 2")))}
    assert table["GSPO"]["step_length_20"] == "-" and table["GSPO"]["responses_to_acc_0.6"] == "-"  # never reached
    assert table["LUSPO"]["step_length_20"] == "14 (14..15)"  # mean of 15 (seed 0) and 14 (seed 1), rounded even
    assert table["LUSPO"]["responses_to_acc_0.6"] == "400 (400..400)"
    assert table["LUSPO"]["rollout_length_steps11_30"] == "31 (30.5..31.5)"
    assert "| LUSPO vs GSPO | +20.5, +20.5 [2/2] |" in summary  # steps 11-30: (10 + s + seed) - (10 + seed)
    numbers = json.loads((out / "summary.json").read_text())
    assert numbers["seeds"] == [0, 1] and numbers["numbers"]["luspo"]["step_length_20"]["values"] == [15, 14]
    with open(runs / "gspo_s1" / "metrics.jsonl", "w", encoding="utf-8") as f:  # stopped at step 29
        f.writelines(json.dumps(r) + "\n" for r in ld_records(29, lambda s: 10.0, lambda s: 0.5))
    with pytest.raises(SystemExit, match="runs not complete"):
        ld.main(argv)
