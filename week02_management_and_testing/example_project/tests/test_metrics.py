"""The metrics: hand-checked cases, then properties that hold for any predictions (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from classifier.metrics import accuracy, confusion_matrix
from hypothesis import given, settings
from hypothesis import strategies as st


@st.composite
def predictions_and_labels(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Predictions and labels of one length (1 to 50) among num_classes (1 to 6) classes."""
    num_classes = draw(st.integers(1, 6))
    n = draw(st.integers(1, 50))
    classes = st.lists(st.integers(0, num_classes - 1), min_size=n, max_size=n)
    return torch.tensor(draw(classes)), torch.tensor(draw(classes)), num_classes


def test_accuracy_and_confusion_on_a_hand_checked_case() -> None:
    predictions, labels = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2])
    assert accuracy(predictions, labels) == 0.75
    assert confusion_matrix(predictions, labels, 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


@pytest.mark.parametrize(
    "predictions, labels", [(torch.tensor([0, 1]), torch.tensor([0])), (torch.tensor([]), torch.tensor([]))]
)
def test_accuracy_refuses_mismatched_or_empty_inputs(predictions: torch.Tensor, labels: torch.Tensor) -> None:
    with pytest.raises(ValueError, match="one non-empty shape"):
        accuracy(predictions, labels)


def test_confusion_refuses_labels_beyond_num_classes() -> None:
    with pytest.raises(ValueError, match="num_classes=2"):
        confusion_matrix(torch.tensor([0, 2]), torch.tensor([0, 1]), 2)


@settings(deadline=None, max_examples=50)
@given(predictions_and_labels())
def test_accuracy_is_the_confusion_matrixs_diagonal(case: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    predictions, labels, num_classes = case
    confusion = confusion_matrix(predictions, labels, num_classes)
    assert 0.0 <= accuracy(predictions, labels) <= 1.0
    assert int(confusion.sum()) == len(labels)
    assert confusion.sum(dim=1).tolist() == torch.bincount(labels, minlength=num_classes).tolist()
    assert accuracy(predictions, labels) == pytest.approx(confusion.trace().item() / len(labels))


@settings(deadline=None, max_examples=50)
@given(predictions_and_labels(), st.randoms(use_true_random=False))
def test_accuracy_ignores_the_order_of_items(case: tuple[torch.Tensor, torch.Tensor, int], rng) -> None:
    predictions, labels, _ = case
    order = list(range(len(labels)))
    rng.shuffle(order)
    assert accuracy(predictions[order], labels[order]) == accuracy(predictions, labels)
    assert accuracy(labels, labels) == 1.0
