"""Hidden tests of `pack_documents` and `document_attention_mask` (task sequence_packing).

The strongest check is the end-to-end one: attention over a packed row, with the mask and the position ids,
must give every document exactly what attending over that document alone gives, and a tiny language model's
per-token losses on the packed batch must equal its losses on each document alone. The rows and the mask are
also compared element by element with references written here from the docstrings, on random documents.
The submission packs and masks in its worker; the attention and the language model run here, on its tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scenarios import packed_batch

from common.grading.client import Submission, raises

# Derandomised: every run draws the same examples. No deadline and no "too slow" health check: graders
# run two jobs at once on two cores, so the time an example takes says nothing about the code. The
# `submission` fixture is a handle on the worker, the same for every example.
SETTINGS = settings(
    database=None,
    deadline=None,
    max_examples=50,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
VOCAB = 50
IGNORE_INDEX, PAD_DOCUMENT = -100, -1  # fastpipe.batching's constants, as its docstrings specify them
MASK = "fastpipe.batching:document_attention_mask"


def pack_documents(
    submission: Submission,
    documents: list[torch.Tensor],
    bins: list[list[int]],
    seq_len: int,
    pad_id: int = 0,
) -> dict[str, torch.Tensor]:
    """The submission's PackedBatch as {field: tensor}."""
    return submission.run(
        packed_batch.pack, documents, bins, seq_len, pad_id, returns=dict[str, torch.Tensor]
    )


def document_attention_mask(
    submission: Submission, document_ids: torch.Tensor, causal: bool = True
) -> torch.Tensor:
    return submission.call(MASK, document_ids, causal=causal, returns=torch.Tensor)


@st.composite
def packings(draw, max_seq_len: int = 24) -> tuple[list[torch.Tensor], list[list[int]], int]:
    """Random documents and a valid assignment of some of them to rows (the test's own next-fit)."""
    seq_len = draw(st.integers(1, max_seq_len))
    lengths = draw(st.lists(st.integers(0, seq_len), max_size=12))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    documents = [torch.randint(VOCAB, (n,), generator=generator) for n in lengths]
    order = torch.randperm(len(documents), generator=generator).tolist()
    left_out = set(draw(st.lists(st.sampled_from(order), max_size=2))) if order else set()
    bins: list[list[int]] = []
    load = seq_len + 1
    for index in order:
        if index in left_out:
            continue
        if load + lengths[index] > seq_len:
            bins.append([])
            load = 0
        bins[-1].append(index)
        load += lengths[index]
    if draw(st.booleans()):
        bins.append([])  # a row of padding only
    return documents, bins, seq_len


def reference_rows(documents: list[torch.Tensor], bins: list[list[int]], seq_len: int, pad_id: int) -> dict:
    rows: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": [], "document_ids": []}
    for members in bins:
        row = {key: [] for key in rows}
        for index in members:
            tokens = documents[index].tolist()
            row["input_ids"] += tokens
            row["labels"] += tokens[1:] + [IGNORE_INDEX] if tokens else []
            row["position_ids"] += list(range(len(tokens)))
            row["document_ids"] += [index] * len(tokens)
        padding = seq_len - len(row["input_ids"])
        for key, value in [("input_ids", pad_id), ("labels", IGNORE_INDEX), ("position_ids", 0)]:
            row[key] += [value] * padding
        row["document_ids"] += [PAD_DOCUMENT] * padding
        for key in rows:
            rows[key].append(row[key])
    return {
        key: torch.tensor(value, dtype=torch.long).reshape(len(bins), seq_len) for key, value in rows.items()
    }


def reference_mask(document_ids: torch.Tensor, causal: bool) -> torch.Tensor:
    rows, seq_len = document_ids.shape
    mask = torch.zeros(rows, seq_len, seq_len, dtype=torch.bool)
    for r in range(rows):
        for q in range(seq_len):
            for k in range(seq_len):
                doc_q, doc_k = int(document_ids[r, q]), int(document_ids[r, k])
                same = doc_q == doc_k != PAD_DOCUMENT and (k <= q or not causal)
                mask[r, q, k] = same or q == k
    return mask


@SETTINGS
@given(packings(), st.integers(-1, 3))
def test_packed_rows_match_the_definition(submission: Submission, packing, pad_id: int) -> None:
    documents, bins, seq_len = packing
    batch = pack_documents(submission, documents, bins, seq_len, pad_id=pad_id)
    expected = reference_rows(documents, bins, seq_len, pad_id)
    for key, value in expected.items():
        got = batch[key]
        assert got.dtype == torch.long, f"{key} must be int64, got {got.dtype}"
        assert got.shape == value.shape, f"{key} has shape {tuple(got.shape)}, expected {tuple(value.shape)}"
        assert torch.equal(got, value), f"{key} differs from the definition"


@SETTINGS
@given(packings(max_seq_len=16), st.booleans())
def test_mask_matches_the_definition(submission: Submission, packing, causal: bool) -> None:
    documents, bins, seq_len = packing
    document_ids = reference_rows(documents, bins, seq_len, pad_id=0)["document_ids"]
    mask = document_attention_mask(submission, document_ids, causal=causal)
    assert mask.dtype == torch.bool, f"the mask must be bool, got {mask.dtype}"
    assert mask.shape == (len(bins), seq_len, seq_len), f"the mask has shape {tuple(mask.shape)}"
    assert torch.equal(mask, reference_mask(document_ids, causal)), "the mask differs from the definition"


def random_documents(lengths: list[int], seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(VOCAB, (n,), generator=generator) for n in lengths]


BINS = [[0, 3, 5], [1, 2], [4], [6, 7, 8, 9]]
LENGTHS = [9, 20, 11, 7, 32, 16, 5, 1, 12, 14]  # rows of 32, 31, 32 and 32 tokens


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_attention_over_a_packed_row_equals_attention_per_document(
    submission: Submission, causal: bool
) -> None:
    documents = random_documents(LENGTHS, seed=0)
    batch = pack_documents(submission, documents, BINS, seq_len=32)
    mask = document_attention_mask(submission, batch["document_ids"], causal=causal)
    assert mask.dtype == torch.bool and mask.shape == (len(BINS), 32, 32), (
        "the mask must be (rows, 32, 32) bool"
    )
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(len(BINS), 2, 32, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    packed = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])
    assert torch.isfinite(packed).all(), "padding rows must not produce NaN"
    for row, members in enumerate(BINS):
        start = 0
        for index in members:
            end = start + LENGTHS[index]
            alone = F.scaled_dot_product_attention(
                q[row, :, start:end], k[row, :, start:end], v[row, :, start:end], is_causal=causal
            )
            # float64 and the same operations: only the order of the sums may differ.
            torch.testing.assert_close(
                packed[row, :, start:end], alone, rtol=1e-10, atol=1e-12, msg=f"document {index} in row {row}"
            )
            start = end


class TinyLM(torch.nn.Module):
    """Token and learned position embeddings, one causal attention layer, an output head."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.tokens = torch.nn.Embedding(VOCAB, dim)
        self.positions = torch.nn.Embedding(64, dim)
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.head = torch.nn.Linear(dim, VOCAB)

    def forward(
        self, input_ids: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        x = self.tokens(input_ids) + self.positions(position_ids)  # (rows, seq, dim)
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if mask is None:
            x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.head(x)  # (rows, seq, vocab)


def test_language_model_losses_on_a_packed_batch_equal_per_document_losses(submission: Submission) -> None:
    torch.manual_seed(0)
    model = TinyLM().double()
    documents = random_documents(LENGTHS, seed=2)
    batch = pack_documents(submission, documents, BINS, seq_len=32, pad_id=3)
    mask = document_attention_mask(submission, batch["document_ids"], causal=True)
    for name, tensor in [*batch.items(), ("mask", mask)]:
        assert tensor.dtype == (torch.bool if name == "mask" else torch.long), (
            f"{name} has dtype {tensor.dtype}"
        )
        assert tensor.shape[:2] == (len(BINS), 32), f"{name} has shape {tuple(tensor.shape)}"
    logits = model(batch["input_ids"], batch["position_ids"], mask)
    packed_losses = F.cross_entropy(logits.transpose(1, 2), batch["labels"], reduction="none")
    expected = []
    for document in documents:
        if len(document) < 2:
            continue
        alone = model(document[None], torch.arange(len(document))[None], None)[0]
        expected.append(F.cross_entropy(alone[:-1], document[1:], reduction="none"))
    counted = batch["labels"] != IGNORE_INDEX
    assert int(counted.sum()) == sum(len(d) - 1 for d in documents if len(d) >= 1), "wrong number of labels"
    torch.testing.assert_close(
        packed_losses[counted].sort().values, torch.cat(expected).sort().values, msg="packed losses differ"
    )


def test_empty_bins_and_empty_documents(submission: Submission) -> None:
    documents = [torch.tensor([4, 5]), torch.tensor([], dtype=torch.long)]
    batch = pack_documents(submission, documents, [], seq_len=6)
    for name, tensor in batch.items():
        assert tensor.shape == (0, 6), f"no bins: {name} must have shape (0, 6), got {tuple(tensor.shape)}"
    mask = document_attention_mask(submission, torch.zeros(0, 6, dtype=torch.long))
    assert mask.shape == (0, 6, 6), f"the mask of no rows must have shape (0, 6, 6), got {tuple(mask.shape)}"
    batch = pack_documents(submission, documents, [[1, 0]], seq_len=3)
    assert batch["input_ids"].tolist() == [[4, 5, 0]], "an empty document takes no room"
    assert batch["document_ids"].tolist() == [[0, 0, PAD_DOCUMENT]], "an empty document takes no room"


@pytest.mark.parametrize(
    ("lengths", "bins", "seq_len"),
    [
        ([5, 4], [[0, 1]], 8),  # the row overflows
        ([9], [[0]], 8),  # a document longer than a row
        ([3, 3], [[0], [0]], 8),  # a document packed twice
        ([3, 3], [[0, 2]], 8),  # an index out of range
        ([3], [[0]], 0),  # no room at all
    ],
)
def test_bad_packings_raise_value_error(
    submission: Submission, lengths: list[int], bins: list[list[int]], seq_len: int
) -> None:
    with raises("ValueError"):
        pack_documents(submission, random_documents(lengths, seed=0), bins, seq_len)
