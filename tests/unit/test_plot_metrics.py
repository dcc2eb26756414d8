"""tools/plot_metrics.py: reading metrics.jsonl, series, smoothing by steps, seed aggregation, the PNG and the CLI."""
import importlib.util
import json
import os

import pytest

TOOL = os.path.join(os.path.dirname(__file__), "..", "..", "tools", "plot_metrics.py")


@pytest.fixture(scope="module")
def pm():
    spec = importlib.util.spec_from_file_location("plot_metrics", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
