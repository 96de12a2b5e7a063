"""The network: two convolution blocks and a linear classifier, small enough to train on a laptop CPU."""

from __future__ import annotations

import torch
from torch import nn


class ConvNet(nn.Module):
    """conv(3 -> w) -> pool -> conv(w -> 2w) -> pool -> global average -> dropout -> linear(2w -> classes)."""

    def __init__(self, num_classes: int, width: int = 16, dropout: float = 0.1, channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, w, H/2, W/2)
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (N, 2w, H/4, W/4)
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float images to (N, num_classes) logits."""
        features = self.features(images).mean(dim=(2, 3))  # (N, 2w)
        return self.head(self.dropout(features))
