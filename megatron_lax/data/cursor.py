"""The global-batch cursor that every training loader shares: where a run is in its sample order,
and which samples this rank reads next.

Step s of an epoch takes positions s*G .. (s+1)*G - 1 of that epoch's order (G: the global batch),
rank r the r-th contiguous share of G / W positions, in micro-batches of M. An epoch has
floor(N / G) steps; the N mod G samples left over differ from epoch to epoch. The order of an
epoch is the loader's (a seeded permutation), a function of (seed, epoch) only, so a run resumed at
a step boundary on any number of ranks reads exactly the samples an uninterrupted run would.

The streamed loader (data/streaming.py) keeps its position here too: there a sample is a lane's
next window, every lane holds the same number of windows per pass of the stream, so (epoch, step)
alone says where each lane is.
"""
from __future__ import annotations

from typing import Callable

import numpy as np


class DataExhausted(RuntimeError):
    pass


# An epoch's order: epoch -> (positions -> sample ids)
Order = Callable[[int], Callable[[np.ndarray], np.ndarray]]


def permutation_order(n: int, seed: int) -> Order:
    """numpy's seeded permutation of n samples, drawn once per epoch."""
    cache: dict[int, np.ndarray] = {}

    def of_epoch(epoch: int):
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, epoch]).permutation(n)
        return lambda positions: cache[epoch][positions]
    return of_epoch


class GlobalBatchCursor:
    """(epoch, step, micro) of this rank, with the one state-dict layout of every loader."""

    def __init__(self, n_samples: int, global_batch: int, micro_batch: int, rank: int, world_size: int, seed: int,
                 order: Order, order_name: str, repeat: bool = True, unit: str = "sample", data: str = "data",
                 legacy_order: str | None = None):
        """`order_name` is saved with the state; a state saved without one was written with
        `legacy_order` (default: this order). `unit` and `data` name what is read, in messages."""
        if global_batch % (micro_batch * world_size):
            raise ValueError(f"global batch {global_batch} is not a multiple of micro batch {micro_batch} "
                             f"x {world_size} ranks")
        self.n_samples, self.global_batch, self.micro_batch = n_samples, global_batch, micro_batch
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.order, self.order_name, self.repeat, self.unit, self.data = order, order_name, repeat, unit, data
        self.legacy_order = legacy_order or order_name
        self.per_rank = global_batch // world_size
        self.micro_per_step = self.per_rank // micro_batch
        self.steps_per_epoch = n_samples // global_batch
        if self.steps_per_epoch == 0:
            raise ValueError(f"{n_samples} {unit}s are fewer than one global batch of {global_batch}")
        self.epoch = self.step = self.micro = 0
        self._step_ids = (None, None)  # ((epoch, step), this rank's ids of that step)

    @property
    def samples_per_epoch(self) -> int:
        return self.steps_per_epoch * self.global_batch

    def step_ids(self, step: int | None = None, epoch: int | None = None) -> np.ndarray:
        """This rank's sample ids at a step (default: the current one), in micro-batch order; computed
        once a step (numpy's per-call cost dominates the order for a few positions)."""
        key = (self.epoch if epoch is None else epoch, self.step if step is None else step)
        if self._step_ids[0] != key:
            start = key[1] * self.global_batch + self.rank * self.per_rank
            self._step_ids = (key, self.order(key[0])(np.arange(start, start + self.per_rank)))
        return self._step_ids[1]

    def start_epoch_if_due(self) -> None:
        """At the end of an epoch: the next one (or DataExhausted when the loader does not repeat)."""
        if self.step < self.steps_per_epoch:
            return
        if not self.repeat:
            raise DataExhausted(f"the train split is exhausted after {self.steps_per_epoch} steps; set "
                                f"train.allow_repetition true to start another epoch")
        self.epoch, self.step = self.epoch + 1, 0

    def next_ids(self) -> np.ndarray:
        """The ids of this rank's next micro-batch; moves the cursor past it."""
        self.start_epoch_if_due()
        first = self.micro * self.micro_batch
        ids = self.step_ids()[first:first + self.micro_batch]
        self.micro += 1
        if self.micro == self.micro_per_step:
            self.step, self.micro = self.step + 1, 0
        return ids

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "micro": self.micro, "seed": self.seed,
                "samples": self.n_samples, "global_batch": self.global_batch, "micro_batch": self.micro_batch,
                "world_size": self.world_size, "order": self.order_name}

    def load_state_dict(self, state: dict) -> None:
        """Checks what the state records (states written before this layout record less: the token
        loader's `sequences`, the instruction loader's `examples`, the image loader only its position)."""
        samples = state.get("samples", state.get("sequences", state.get("examples")))
        if samples is not None and samples != self.n_samples or state.get("seed", self.seed) != self.seed:
            raise ValueError(f"the loader state belongs to other {self.data} or another data seed")
        saved_order = state.get("order", self.legacy_order)
        if saved_order != self.order_name:
            raise ValueError(f"the loader state was saved by a loader with another {self.unit} order "
                             f"({saved_order}, not {self.order_name}); it cannot be continued exactly")
        if state.get("global_batch", self.global_batch) != self.global_batch:
            raise ValueError(f"the loader state was saved with global batch {state['global_batch']}, "
                             f"not {self.global_batch}")
        epoch, step, micro = int(state["epoch"]), int(state["step"]), int(state["micro"])
        mid_step_layout = (state.get("world_size", self.world_size), state.get("micro_batch", self.micro_batch))
        if micro and mid_step_layout != (self.world_size, self.micro_batch):  # a micro index means per-rank data
            raise ValueError(f"the loader state was saved mid-step on {mid_step_layout[0]} ranks with micro batch "
                             f"{mid_step_layout[1]}; it resumes on another layout only at a step boundary")
        if not (epoch >= 0 and 0 <= step <= self.steps_per_epoch and 0 <= micro < self.micro_per_step):
            raise ValueError(f"loader state {state} does not fit {self.steps_per_epoch} steps of "
                             f"{self.micro_per_step} micro-batches")
        self.epoch, self.step, self.micro = epoch, step, micro
