"""Runs in the submission's worker: a LengthBucketBatchSampler in a real DataLoader. Observations only."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Sampler


def dataloader_epoch(sampler: Sampler, lengths: list[int]) -> dict:
    """One epoch of a DataLoader over sequences `torch.full((length,), index)`, batched by `sampler`.

    Returns whether the sampler is a `torch.utils.data.Sampler`, the index of every sequence seen (the first
    element of each padded row) and the number of padding positions in all batches.
    """
    dataset = [torch.full((length,), index) for index, length in enumerate(lengths)]

    def collate(items: list[torch.Tensor]) -> torch.Tensor:
        return torch.nn.utils.rnn.pad_sequence(items, batch_first=True, padding_value=-1)

    seen, padding = [], 0
    for batch in DataLoader(dataset, batch_sampler=sampler, collate_fn=collate):
        seen += [int(row[0]) for row in batch]
        padding += int((batch == -1).sum())
    return {"is_sampler": isinstance(sampler, Sampler), "seen": seen, "padding": padding}
