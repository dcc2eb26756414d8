"""Wall-clock breakdown of a step: `with timer("rollout"): ...`; `timer.breakdown(total)` adds "other"."""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict


class StepTimer:
    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def breakdown(self) -> dict[str, float]:
        """time/<part> for every part, time/other for the rest, time/step for the whole step."""
        total = time.perf_counter() - self.start
        out = {f"time/{name}": value for name, value in self.seconds.items()}
        out["time/other"] = max(0.0, total - sum(self.seconds.values()))
        out["time/step"] = total
        return out
