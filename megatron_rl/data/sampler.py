"""A seeded, resumable prompt sampler whose position is part of the checkpoint.

Epoch e visits every index once in the order ``permutation(seed, e)``; batches run across epoch boundaries (no
prompt is dropped or repeated within an epoch). ``state_dict()`` is (seed, epoch, position, num_items) -- saved
with the model checkpoint, ``load_state_dict`` continues with exactly the indices that would have come next
(docs/design.md, contract 5: a killed run resumes with nothing lost or repeated).
"""
from __future__ import annotations

import numpy as np

STATE_VERSION = 1


class ResumableSampler:
    """Indices into a dataset of ``num_items`` prompts, reshuffled each epoch from (seed, epoch)."""

    def __init__(self, num_items: int, seed: int = 0, shuffle: bool = True):
        if num_items < 1:
            raise ValueError(f"sampler needs at least one item, got num_items={num_items}")
        self.num_items = num_items
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # how many indices of the current epoch's order were already handed out
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_items)
        # SeedSequence over (seed, epoch): independent streams per epoch, no collision between (s, e+1) and (s+1, e).
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` indices (continuing into the next epoch's shuffled order when this one ends)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        indices: list[int] = []
        while len(indices) < count:
            if self.position == self.num_items:
                self.epoch += 1
                self.position = 0
                self._order = self._epoch_order(self.epoch)
            take = min(count - len(indices), self.num_items - self.position)
            indices.extend(int(i) for i in self._order[self.position:self.position + take])
            self.position += take
        return indices

    def state_dict(self) -> dict[str, int | bool]:
        return {"version": STATE_VERSION, "num_items": self.num_items, "seed": self.seed, "shuffle": self.shuffle,
                "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``. The dataset size and seed must match: a different dataset would silently
        change which prompts come next."""
        missing = {"num_items", "seed", "shuffle", "epoch", "position"} - set(state)
        if missing:
            raise ValueError(f"sampler state is missing {sorted(missing)}; got keys {sorted(state)}")
        for key in ("num_items", "seed", "shuffle"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state has {key}={state[key]!r} but this sampler has {key}={getattr(self, key)!r}: "
                    f"the checkpoint was written for a different dataset or data seed; resume with the same data"
                )
        if not 0 <= state["position"] <= self.num_items or state["epoch"] < 0:
            raise ValueError(f"sampler state has epoch={state['epoch']}, position={state['position']} outside "
                             f"[0, num_items={self.num_items}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
