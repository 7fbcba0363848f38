"""Which examples each optimizer step sees, how they are split into micro-batches, and how they are padded.

The step plan is a pure function of (number of examples, batch size, epochs, seed), so a resumed run and
every process of a distributed run agree on it without communicating.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from specialize.prompts import IGNORE_INDEX, TrainFeatures


@dataclass(frozen=True)
class StepPlan:
    n_examples: int
    batch_size: int
    epochs: int
    seed: int

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n_examples, generator=g).tolist()

    def indices(self, step: int) -> list[int]:
        """Example indices of one optimizer step (the last step of an epoch may be smaller)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return order[within * self.batch_size : (within + 1) * self.batch_size]


def micro_batches(indices: Sequence[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    """Length-sorted micro-batches of one step: less padding, and the step's loss is unchanged
    because it is a sum over the step's tokens whatever their grouping."""
    ordered = sorted(indices, key=lambda i: (lengths[i], i))
    return [ordered[k : k + size] for k in range(0, len(ordered), size)]


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    return list(indices[rank::world])


def response_tokens(features: Sequence[TrainFeatures], indices: Sequence[int]) -> int:
    """Tokens that carry loss in these examples: the normalizer of a step's loss."""
    return sum(sum(1 for label in features[i].labels if label != IGNORE_INDEX) for i in indices)


def collate(features: Sequence[TrainFeatures], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example. Padding is masked by position (labels -100, attention 0),
    never by token id, so a pad id equal to EOS does not hide the trained EOS."""
    width = max(len(f.input_ids) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        n = len(f.input_ids)
        ids[row, :n] = torch.tensor(f.input_ids)
        labels[row, :n] = torch.tensor(f.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
