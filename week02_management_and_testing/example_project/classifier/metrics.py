"""Scores of predicted labels against true labels."""

from __future__ import annotations

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of predictions equal to their label; predictions and labels are int tensors (N,)."""
    if predictions.shape != labels.shape or len(labels) == 0:
        raise ValueError(
            f"need predictions and labels of one non-empty shape, got {tuple(predictions.shape)} "
            f"and {tuple(labels.shape)}"
        )
    return (predictions == labels).float().mean().item()


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, num_classes) int64 counts: entry [t, p] counts items of label t predicted as p."""
    if len(labels) and int(max(predictions.max(), labels.max())) >= num_classes:
        raise ValueError(f"a label or prediction is >= num_classes={num_classes}")
    flat = labels.long() * num_classes + predictions.long()
    return torch.bincount(flat, minlength=num_classes**2).view(num_classes, num_classes)
