#!/usr/bin/env python
"""Plot training curves (accuracy / reward, response length, any logged key) of one or several runs from their
metrics.jsonl into a PNG.

  python tools/plot_metrics.py runs/quickstart                              # one run, default panels
  python tools/plot_metrics.py runs/a runs/b --out curves.png               # two runs, one line each
  python tools/plot_metrics.py --run GSPO=runs/gspo_s0 --run GSPO=runs/gspo_s1 --run LUSPO=runs/luspo_s0 \\
      --keys rollout/response_length_mean,eval/accuracy --smooth 5 --out length.png
  python tools/plot_metrics.py runs/a --x sampling/responses_generated     # x = cumulative responses sampled

A run is a run folder (holding metrics.jsonl) or a metrics.jsonl path. Runs given the same LABEL (`--run
LABEL=PATH`) are seeds of one method: they are drawn as their mean with a band from the lowest to the highest seed
(the band is the spread over seeds, not a confidence interval). Positional runs are labelled by their folder name.
--x with a per-step count (e.g. sampling/responses_generated) plots against its running total: sample efficiency.
Keys that a run never logged are reported, not silently skipped; steps where a key is missing (e.g. eval/* between
evaluations) are left out of that key's curve.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections import OrderedDict
from typing import Sequence

DEFAULT_KEYS = ("rollout/accuracy", "eval/accuracy", "rollout/response_length_mean")


def metrics_path(run: str) -> str:
    path = os.path.join(run, "metrics.jsonl") if os.path.isdir(run) else run
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics.jsonl at {run!r} (give a run folder or a metrics.jsonl path)")
    return path


def read_records(run: str) -> list[dict]:
    """The step records of a run, in file order (lines cut by a crash are skipped; later duplicates of a step win,
    as after a resume)."""
    by_step: dict[int, dict] = {}
    with open(metrics_path(run), encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and "step" in record:
                by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return None
    return float(value)


def series(records: Sequence[dict], key: str, x_key: str = "step") -> tuple[list[float], list[float], list[int]]:
    """(x, y, step) of `key` over the records that have it. x is the step, or the running total of `x_key` over
    all records up to and including that step (records without x_key add 0)."""
    xs, ys, steps, total = [], [], [], 0.0
    for record in records:
        if x_key == "step":
            x = float(record["step"])
        else:
            total += _number(record.get(x_key)) or 0.0
            x = total
        y = _number(record.get(key))
        if y is not None:
            xs.append(x)
            ys.append(y)
            steps.append(int(record["step"]))
    return xs, ys, steps


def smooth(values: Sequence[float], steps: Sequence[int], window: int) -> list[float]:
    """Trailing moving average over the last `window` steps: each point averages the points logged at steps
    s - window < step <= s (so a key logged every 10 steps, like eval/*, is not averaged with 50 steps' worth of
    history when window = 5)."""
    out = []
    for i, s in enumerate(steps):
        window_values = [v for v, t in zip(values[: i + 1], steps[: i + 1]) if t > s - window]
        out.append(sum(window_values) / len(window_values))
    return out


def aggregate(curves: Sequence[tuple[Sequence[float], Sequence[float]]]):
    """Mean, min and max over seeds. Seeds logged at the same x (steps) are combined point by point; otherwise
    (x = a running total, which differs between seeds) each seed is interpolated linearly onto the union of the
    x values inside the range every seed covers. Returns (x, mean, low, high); empty lists when the seeds' ranges
    do not overlap."""
    import numpy as np

    if all(list(xs) == list(curves[0][0]) for xs, _ in curves):
        xs = np.asarray(curves[0][0], dtype=float)
        values = np.asarray([ys for _, ys in curves], dtype=float)
    else:
        lo, hi = max(min(xs) for xs, _ in curves), min(max(xs) for xs, _ in curves)
        xs = np.unique(np.concatenate([np.asarray(x, dtype=float) for x, _ in curves]))
        xs = xs[(xs >= lo) & (xs <= hi)]
        values = np.asarray([np.interp(xs, x, y) for x, y in curves], dtype=float)
    if xs.size == 0:
        return [], [], [], []
    return xs.tolist(), values.mean(0).tolist(), values.min(0).tolist(), values.max(0).tolist()


def group_runs(labelled: Sequence[tuple[str, str]]) -> "OrderedDict[str, list[str]]":
    groups: OrderedDict[str, list[str]] = OrderedDict()
    for label, path in labelled:
        groups.setdefault(label, []).append(path)
    return groups


def plot(labelled: Sequence[tuple[str, str]], out: str, *, keys: Sequence[str] = DEFAULT_KEYS, x_key: str = "step",
         smooth_window: int = 1, title: str | None = None) -> dict:
    """Draw one panel per key, one curve (or mean + seed band) per label, into `out` (PNG). Returns a summary:
    {"missing": [(label, run, key) never logged], "final": {label: {key: mean of the last point over seeds}}}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(labelled)
    records = {path: read_records(path) for paths in groups.values() for path in paths}
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    missing, final = [], {}
    for ax, key in zip(axes.flat, keys):
        for color, (label, paths) in zip(_colors(len(groups)), groups.items()):
            curves = []
            for path in paths:
                xs, ys, steps = series(records[path], key, x_key)
                if not xs:
                    missing.append((label, path, key))
                    continue
                curves.append((xs, smooth(ys, steps, smooth_window)))
            if not curves:
                continue
            xs, mean, low, high = aggregate(curves)
            n = len(curves)
            ax.plot(xs, mean, color=color, label=label if n == 1 else f"{label} (mean of {n})")
            if n > 1:
                ax.fill_between(xs, low, high, color=color, alpha=0.18, linewidth=0)
            if mean:
                final.setdefault(label, {})[key] = mean[-1]
        ax.set_title(key)
        ax.set_xlabel("RL step" if x_key == "step" else f"cumulative {x_key}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return {"missing": missing, "final": final}


def _colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def parse_runs(positional: Sequence[str], labelled: Sequence[str]) -> list[tuple[str, str]]:
    runs = [(os.path.basename(os.path.normpath(p)) if os.path.isdir(p) else
             os.path.basename(os.path.dirname(os.path.abspath(p))), p) for p in positional]
    for item in labelled:
        label, sep, path = item.partition("=")
        if not sep or not label or not path:
            raise ValueError(f"--run expects LABEL=PATH, got {item!r}")
        runs.append((label, path))
    if not runs:
        raise ValueError("give at least one run (a folder with metrics.jsonl, or --run LABEL=PATH)")
    for _, path in runs:
        metrics_path(path)
    return runs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", help="run folders or metrics.jsonl files (labelled by folder name)")
    parser.add_argument("--run", action="append", default=[], metavar="LABEL=PATH",
                        help="a labelled run; runs sharing a label are seeds (mean + min-max band)")
    parser.add_argument("--keys", default=",".join(DEFAULT_KEYS), help="comma-separated metric keys, one panel each")
    parser.add_argument("--x", default="step", help="x axis: step, or a per-step count to accumulate")
    parser.add_argument("--smooth", type=int, default=1, help="trailing moving average over this many steps")
    parser.add_argument("--title")
    parser.add_argument("--out", default="metrics.png", help="output PNG")
    args = parser.parse_args(argv)
    try:
        runs = parse_runs(args.runs, args.run)
    except (ValueError, FileNotFoundError) as e:
        print(f"plot_metrics: {e}", file=sys.stderr)
        return 2
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    if not keys or args.smooth < 1:
        print("plot_metrics: --keys needs at least one key and --smooth must be >= 1", file=sys.stderr)
        return 2
    summary = plot(runs, args.out, keys=keys, x_key=args.x, smooth_window=args.smooth, title=args.title)
    for label, path, key in summary["missing"]:
        print(f"plot_metrics: {label} ({path}) never logged {key!r}", file=sys.stderr)
    print(f"plot_metrics: wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
