"""Public tests of `fastpipe.batching`; the hidden tests check the same properties on random inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from fastpipe.batching import (
    IGNORE_INDEX,
    PAD_DOCUMENT,
    LengthBucketBatchSampler,
    document_attention_mask,
    first_fit_decreasing,
    pack_documents,
)

LENGTHS = [12, 3, 7, 30, 5, 5, 28, 11, 4, 6, 29, 13, 3, 8]


def test_bucketing_sampler_unshuffled() -> None:
    sampler = LengthBucketBatchSampler(LENGTHS, batch_size=4, max_spread=3, shuffle=False)
    # Sorted by (length, index): 3 3 4 5 | 5 6 7 8 | 11 12 13 | 28 29 30.
    assert list(sampler) == [[1, 12, 8, 4], [5, 9, 2, 13], [7, 0, 11], [6, 10, 3]]
    assert len(sampler) == 4


def test_bucketing_sampler_shuffled_keeps_the_invariants() -> None:
    sampler = LengthBucketBatchSampler(LENGTHS, batch_size=4, max_spread=3, shuffle=True, seed=0)
    batches = list(sampler)
    assert sorted(i for batch in batches for i in batch) == list(range(len(LENGTHS)))
    for batch in batches:
        assert len(batch) <= 4
        assert max(LENGTHS[i] for i in batch) - min(LENGTHS[i] for i in batch) <= 3
    assert batches == list(sampler), "the same seed and epoch give the same batches"


def test_first_fit_decreasing() -> None:
    # Decreasing: 8 (item 2), 7 (4), 5 (0), 4 (3), 2 (1), 2 (5); capacity 10.
    assert first_fit_decreasing([5, 2, 8, 4, 7, 2], capacity=10) == [[2, 1], [4, 5], [0, 3]]
    assert first_fit_decreasing([], capacity=10) == []
    with pytest.raises(ValueError):
        first_fit_decreasing([5, 11], capacity=10)


def test_packing_and_mask() -> None:
    documents = [torch.tensor([10, 11, 12]), torch.tensor([20, 21]), torch.tensor([30])]
    batch = pack_documents(documents, [[0, 2], [1]], seq_len=5, pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 30, 0], [20, 21, 0, 0, 0]]
    assert batch.labels.tolist() == [
        [11, 12, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
        [21, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],
    ]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 0], [0, 1, 0, 0, 0]]
    assert batch.document_ids.tolist() == [
        [0, 0, 0, 2, PAD_DOCUMENT],
        [1, 1, PAD_DOCUMENT, PAD_DOCUMENT, PAD_DOCUMENT],
    ]
    mask = document_attention_mask(batch.document_ids, causal=True)
    assert mask[0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]


def test_packed_attention_equals_per_document_attention() -> None:
    generator = torch.Generator().manual_seed(0)
    lengths = [5, 9, 2]
    documents = [torch.zeros(n, dtype=torch.long) for n in lengths]
    batch = pack_documents(documents, [[0, 1, 2]], seq_len=20)
    mask = document_attention_mask(batch.document_ids, causal=True)
    q, k, v = (torch.randn(1, 2, 20, 4, generator=generator, dtype=torch.float64) for _ in range(3))
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    start = 0
    for n in lengths:
        alone = F.scaled_dot_product_attention(
            *(t[..., start : start + n, :] for t in (q, k, v)), is_causal=True
        )
        torch.testing.assert_close(packed[..., start : start + n, :], alone)
        start += n
