"""Runs in the submission's worker: `pack_documents`, with its `PackedBatch` taken apart into tensors."""

from __future__ import annotations

import torch

FIELDS = ("input_ids", "labels", "position_ids", "document_ids")


def pack(documents: list[torch.Tensor], bins: list[list[int]], seq_len: int, pad_id: int = 0) -> dict:
    """The fields of `pack_documents(documents, bins, seq_len, pad_id)`, as they are."""
    from fastpipe.batching import pack_documents

    batch = pack_documents(documents, bins, seq_len, pad_id=pad_id)
    return {field: getattr(batch, field) for field in FIELDS}
