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


def pack_rows(indices: Sequence[int], lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Examples grouped into rows of at most `capacity` tokens (first fit, longest first), rows shortest first.
    A row of several examples wastes no slots on padding; each example still attends only to itself
    (`collate(..., packed=True)`)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(indices, key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"example {i} has {lengths[i]} tokens, more than a row of {capacity}")
        r = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if r is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[r].append(i)
            room[r] -= lengths[i]
    return sorted(rows, key=lambda row: (sum(lengths[i] for i in row), row))


def micro_batches(
    indices: Sequence[int], lengths: Sequence[int], size: int, capacity: int | None = None
) -> list[list[list[int]]]:
    """One step's micro-batches of `size` rows, each row a list of example indices: one example per row sorted
    by length (less padding), or, with `capacity`, examples packed into rows of that many tokens. The step's
    loss is unchanged either way: it is a sum over the step's tokens whatever their grouping."""
    if capacity is None:
        rows = [[i] for i in sorted(indices, key=lambda i: (lengths[i], i))]
    else:
        rows = pack_rows(indices, lengths, capacity)
    return [rows[k : k + size] for k in range(0, len(rows), size)]


def shard(indices: Sequence[int], rank: int, world: int) -> list[int]:
    return list(indices[rank::world])


def response_tokens(features: Sequence[TrainFeatures], indices: Sequence[int]) -> int:
    """Tokens that carry loss in these examples: the normalizer of a step's loss."""
    return sum(sum(1 for label in features[i].labels if label != IGNORE_INDEX) for i in indices)


def collate(rows: Sequence[Sequence[TrainFeatures]], pad_id: int, *, packed: bool = False) -> dict[str, torch.Tensor]:
    """Rows of examples, right-padded to the longest row. Padding is masked by position, never by token id, so a
    pad id equal to EOS does not hide the trained EOS.

    Unpacked (one example per row): an attention mask hides the padding. Packed: position ids restart at 0 for
    every example and there is no attention mask, from which transformers builds a block-diagonal causal mask
    (each example, and the padding tail, attends only to itself). An example's first token is never a target,
    as it is not at the start of an unpacked row: the previous example's last position does not predict it."""
    if not packed and any(len(r) != 1 for r in rows):
        raise ValueError("unpacked rows hold one example each")
    width = max(sum(len(f.input_ids) for f in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for f in row:
            n = len(f.input_ids)
            ids[r, at : at + n] = torch.tensor(f.input_ids)
            labels[r, at + 1 : at + n] = torch.tensor(f.labels[1:])
            positions[r, at : at + n] = torch.arange(n)
            mask[r, at : at + n] = 1
            at += n
        positions[r, at:] = torch.arange(width - at)  # the padding tail is a block of its own
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": positions}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
