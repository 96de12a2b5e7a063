"""The model: shapes for the sizes the project uses, and dropout's statistics."""

from __future__ import annotations

import math

import pytest
import torch
from classifier.model import ConvNet


@pytest.mark.parametrize("size", [8, 16, 32])
@pytest.mark.parametrize("num_classes", [2, 10])
def test_logits_have_one_row_per_image_and_one_column_per_class(size: int, num_classes: int) -> None:
    model = ConvNet(num_classes, width=4)
    assert model(torch.randn(5, 3, size, size)).shape == (5, num_classes)


def test_eval_mode_is_deterministic_and_train_mode_is_not() -> None:
    torch.manual_seed(0)
    model, x = ConvNet(3, width=4, dropout=0.5), torch.randn(4, 3, 8, 8)
    assert torch.equal(model.eval()(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_the_mean_within_its_standard_error(p: float) -> None:
    """Inverted dropout multiplies each input by 0 (probability p) or 1/(1-p): mean 1, variance p/(1-p).
    Over n inputs the mean's standard error is sqrt(p / (1-p) / n); 5 of them is the tolerance (see
    test_transforms.py on why 5)."""
    n = 100_000
    dropout = ConvNet(2, dropout=p).dropout.train()
    torch.manual_seed(0)
    out = dropout(torch.ones(n))
    assert ((out == 0) | torch.isclose(out, torch.tensor(1 / (1 - p)))).all()
    standard_error = math.sqrt(p / (1 - p) / n)
    assert abs(out.mean().item() - 1) < 5 * standard_error
    assert abs((out == 0).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
