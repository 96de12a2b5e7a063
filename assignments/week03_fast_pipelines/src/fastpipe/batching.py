"""Batching variable-length sequences without paying for padding.

A batch of sequences is padded to its longest member, so a batch that mixes a 20-token and a 2000-token
sequence spends most of its compute on padding. Two ways out:

- **Length bucketing** (`LengthBucketBatchSampler`): put sequences of similar length in the same batch. The
  sampler sorts the dataset by length with a counting sort (lengths are small integers: O(n + max_length), no
  comparison sort) and cuts the sorted order into batches whose lengths differ by at most `max_spread`.
- **Packing** (`first_fit_decreasing`, `pack_documents`, `document_attention_mask`): concatenate several
  documents into one fixed-length row. First-fit decreasing decides which documents share a row; the
  block-diagonal attention mask keeps each document from seeing the others, position ids restart at every
  document, and labels never ask a document to predict the next one's first token.

A packed batch for a language model, end to end:

    bins = first_fit_decreasing([len(doc) for doc in documents], capacity=seq_len)
    batch = pack_documents(documents, bins, seq_len)
    mask = document_attention_mask(batch.document_ids, causal=True)   # (rows, seq_len, seq_len), True = attend
    # scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None]) with q, k, v of shape (rows, heads, seq_len, d)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import Sampler

IGNORE_INDEX = -100
"""Label of positions that have no target (padding, a document's last token): `cross_entropy` skips them."""

PAD_DOCUMENT = -1
"""Document id of padding positions in `PackedBatch.document_ids`."""


class LengthBucketBatchSampler(Sampler[list[int]]):
    """Yield batches (lists of dataset indices) of sequences with similar lengths.

    Batches are formed greedily over the indices sorted by length (ties by index): a batch takes the next
    index while it holds fewer than `batch_size` indices and its longest length minus its shortest stays
    <= `max_spread`; otherwise the next batch starts. Greedy over the sorted order gives the fewest batches any
    split can have under these two constraints. Every index appears in exactly one batch per epoch.

    With `shuffle=False` the batches come in that order: ascending length, indices in ascending order within
    a batch and among equal lengths. With `shuffle=True` the indices of equal length are first put in a random
    order (so batches differ between epochs but have the same lengths), and the batches are yielded in a
    random order. The randomness is a function of `(seed, epoch)` only: the same pair always gives the same
    batches, as with `DistributedSampler`, call `set_epoch` before each epoch to get a new order.

    Costs: O(n + max_length - min_length) to set up and per epoch (counting sort; no comparison sort), O(1)
    amortised per batch.

    Args:
        lengths: the length of every sequence in the dataset, non-negative integers (may be empty).
        batch_size: the most indices in one batch, >= 1.
        max_spread: the largest allowed difference between the longest and shortest length in a batch, >= 0.
        shuffle: whether to shuffle as described above.
        seed: the base seed of the shuffle.

    Raises:
        ValueError: a negative length, `batch_size < 1` or `max_spread < 0`.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        max_spread: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
    ) -> None:
        # BEGIN SOLUTION: LengthBucketBatchSampler.__init__: validate, counting-sort the lengths and cut the sorted order into batch sizes
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if max_spread < 0:
            raise ValueError(f"max_spread must be >= 0, got {max_spread}")
        self.lengths = [int(length) for length in lengths]
        if self.lengths and min(self.lengths) < 0:
            raise ValueError(f"lengths must be non-negative, got {min(self.lengths)}")
        self.batch_size = batch_size
        self.max_spread = max_spread
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        # Batch boundaries depend only on the sorted lengths, which shuffling ties does not change:
        # compute the batch sizes once, here.
        sorted_lengths = [self.lengths[i] for i in self._sort_by_length(range(len(self.lengths)))]
        self._batch_sizes: list[int] = []
        start = 0
        while start < len(sorted_lengths):
            end = start + 1
            while (
                end < len(sorted_lengths)
                and end - start < batch_size
                and sorted_lengths[end] - sorted_lengths[start] <= max_spread
            ):
                end += 1
            self._batch_sizes.append(end - start)
            start = end
        # END SOLUTION

    def _sort_by_length(self, indices: Iterator[int] | range) -> list[int]:
        """Stable counting sort of `indices` by their length: O(n + max_length - min_length)."""
        # BEGIN SOLUTION: LengthBucketBatchSampler._sort_by_length: stable counting sort of the indices by length
        if not self.lengths:
            return []
        low = min(self.lengths)
        buckets: list[list[int]] = [[] for _ in range(max(self.lengths) - low + 1)]
        for index in indices:
            buckets[self.lengths[index] - low].append(index)
        return [index for bucket in buckets for index in bucket]
        # END SOLUTION

    def set_epoch(self, epoch: int) -> None:
        """Use `epoch` for the shuffle of the next iterations (no effect when `shuffle=False`)."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        """Yield the batches of one epoch, as described in the class docstring."""
        # BEGIN SOLUTION: LengthBucketBatchSampler.__iter__: sort indices by length (ties shuffled if shuffle), cut into batches, shuffle their order if shuffle
        n = len(self.lengths)
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else range(n)
        by_length = self._sort_by_length(order)
        batches: list[list[int]] = []
        start = 0
        for size in self._batch_sizes:
            batches.append(by_length[start : start + size])
            start += size
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        yield from batches
        # END SOLUTION

    def __len__(self) -> int:
        """The number of batches per epoch (the same for every epoch)."""
        # BEGIN SOLUTION: LengthBucketBatchSampler.__len__: return the number of batches per epoch
        return len(self._batch_sizes)
        # END SOLUTION


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Pack items into as few bins as first-fit decreasing finds, each bin's total size <= capacity.

    The algorithm: take the items in decreasing order of size (equal sizes in increasing order of index); put
    each one into the first bin, in order of creation, whose remaining room is at least its size; open a new
    bin if none has room. FFD never uses more than 11/9 OPT + 6/9 bins (Dósa, 2007), where OPT is the fewest
    possible.

    A linear scan of the bins costs O(n * bins); a segment tree over the bins' remaining room finds the first
    bin that fits in O(log n), so O(n log n) in total (optional: the graded sizes are small).

    Args:
        sizes: the size of every item, non-negative integers (may be empty).
        capacity: the room in each bin, >= 1.

    Returns:
        The bins in order of creation, each the list of its items' indices in the order they were placed.
        Every index appears in exactly one bin; an empty input gives no bins.

    Raises:
        ValueError: `capacity < 1`, a negative size, or an item larger than the capacity (the message names
            the item, its size and the capacity).
    """
    # BEGIN SOLUTION: first_fit_decreasing: validate, then place items by decreasing size into the first bin with room
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    for index, size in enumerate(sizes):
        if size < 0:
            raise ValueError(f"item {index} has a negative size {size}")
        if size > capacity:
            raise ValueError(
                f"item {index} has size {size} > capacity {capacity}: it fits in no bin; "
                "split it or raise the capacity"
            )
    order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    # A max segment tree over the remaining room of up to n bins (unopened bins count as full room):
    # the first bin with room >= size is found by walking down the tree, left child first.
    leaves = 1
    while leaves < max(len(sizes), 1):
        leaves *= 2
    room = [capacity] * (2 * leaves)
    bins: list[list[int]] = []
    for item in order:
        node = 1
        while node < leaves:
            node = 2 * node if room[2 * node] >= sizes[item] else 2 * node + 1
        bin_index = node - leaves
        if bin_index == len(bins):
            bins.append([])
        bins[bin_index].append(item)
        room[node] -= sizes[item]
        node //= 2
        while node >= 1:
            room[node] = max(room[2 * node], room[2 * node + 1])
            node //= 2
    return bins
    # END SOLUTION


@dataclass(frozen=True)
class PackedBatch:
    """Documents packed into rows of a fixed length; every tensor is (rows, seq_len), dtype int64."""

    input_ids: torch.Tensor
    """The tokens: each row holds its documents back to back, then `pad_id` up to `seq_len`."""
    labels: torch.Tensor
    """The next token of the same document, `IGNORE_INDEX` at a document's last token and on padding."""
    position_ids: torch.Tensor
    """0, 1, 2, ... restarting at the first token of each document; 0 on padding."""
    document_ids: torch.Tensor
    """The index (in `documents`) of the document each token belongs to; `PAD_DOCUMENT` on padding."""


def pack_documents(
    documents: Sequence[torch.Tensor], bins: Sequence[Sequence[int]], seq_len: int, pad_id: int = 0
) -> PackedBatch:
    """Pack documents into rows: row r holds the documents `bins[r]`, in that order, then padding.

    Args:
        documents: 1-D integer tensors of token ids (a document may be empty).
        bins: for each row, the indices of its documents, e.g. from `first_fit_decreasing`. A document may be
            left out; none may appear twice.
        seq_len: the length of every row, >= 1.
        pad_id: the token id of padding.

    Returns:
        A `PackedBatch` with `len(bins)` rows (tensors of shape (0, seq_len) if `bins` is empty).

    Raises:
        ValueError: `seq_len < 1`, a document that is not 1-D, an index out of range or used twice, or a row
            whose documents add up to more than `seq_len` tokens (the message names the row).
    """
    # BEGIN SOLUTION: pack_documents: validate, then fill input_ids, labels, position_ids and document_ids row by row
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    for index, document in enumerate(documents):
        if document.dim() != 1:
            raise ValueError(f"document {index} must be 1-D, got shape {tuple(document.shape)}")
    shape = (len(bins), seq_len)
    input_ids = torch.full(shape, pad_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros(shape, dtype=torch.long)
    document_ids = torch.full(shape, PAD_DOCUMENT, dtype=torch.long)
    used: set[int] = set()
    for row, members in enumerate(bins):
        for index in members:
            if not 0 <= index < len(documents):
                raise ValueError(
                    f"row {row} names document {index}, but there are {len(documents)} documents"
                )
            if index in used:
                raise ValueError(f"document {index} is packed twice (again in row {row})")
            used.add(index)
        total = sum(len(documents[index]) for index in members)
        if total > seq_len:
            raise ValueError(
                f"row {row} holds {total} tokens > seq_len {seq_len}: repack with capacity={seq_len}"
            )
        start = 0
        for index in members:
            tokens = documents[index]
            end = start + len(tokens)
            input_ids[row, start:end] = tokens
            if len(tokens) > 1:  # a document's last token has no next token to predict
                labels[row, start : end - 1] = tokens[1:]
            position_ids[row, start:end] = torch.arange(len(tokens))
            document_ids[row, start:end] = index
            start = end
    return PackedBatch(input_ids, labels, position_ids, document_ids)
    # END SOLUTION


def document_attention_mask(document_ids: torch.Tensor, causal: bool = True) -> torch.Tensor:
    """The block-diagonal attention mask of packed rows: a token sees only tokens of its own document.

    `mask[r, q, k]` is True where query position q of row r may attend to key position k: both belong to the
    same document (`document_ids[r, q] == document_ids[r, k] != PAD_DOCUMENT`) and, if `causal`, k <= q. A
    padding query attends only to itself, so no row of the mask is all False (softmax over an all-masked row
    gives NaN) and no real token ever attends to padding.

    Args:
        document_ids: (rows, seq_len) integer tensor, as in `PackedBatch.document_ids`.
        causal: also forbid attending to later positions of the same document.

    Returns:
        A bool tensor of shape (rows, seq_len, seq_len), on the device of `document_ids`; pass it to
        `scaled_dot_product_attention` as `attn_mask` (True = may attend), after adding a heads dimension.
    """
    # BEGIN SOLUTION: document_attention_mask: same document and not padding (and k <= q if causal); padding sees itself
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be (rows, seq_len), got shape {tuple(document_ids.shape)}")
    seq_len = document_ids.shape[1]
    is_document = document_ids != PAD_DOCUMENT
    mask = (document_ids[:, :, None] == document_ids[:, None, :]) & is_document[:, None, :]
    if causal:
        mask &= torch.ones(seq_len, seq_len, dtype=torch.bool, device=document_ids.device).tril()
    return mask | torch.eye(seq_len, dtype=torch.bool, device=document_ids.device)
    # END SOLUTION
