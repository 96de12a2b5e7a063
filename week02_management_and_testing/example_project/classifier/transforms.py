"""Batch transforms: uint8 pixels to normalised floats, and the random augmentations of training.

Every random transform takes a `torch.Generator`, so a test (or a rerun) can fix its randomness.
"""

from __future__ import annotations

import torch


def normalize(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) to float32 with per-channel mean 0 and std 1 where mean/std are the data's own."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize expects uint8 pixels, got {images.dtype}")
    return (images.float() - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def channel_stats(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of uint8 (N, C, H, W) images, as floats (std at least 1e-3)."""
    pixels = images.float().transpose(0, 1).reshape(images.shape[1], -1)  # (C, N*H*W)
    return pixels.mean(dim=1), pixels.std(dim=1, correction=0).clamp_min(1e-3)


def random_hflip(images: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image left-right with probability p, independently."""
    flip = torch.rand(len(images), generator=generator) < p  # (N,)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to `padding` pixels in x and y, filling with zeros: same shape out."""
    if padding == 0:
        return images
    n, _, h, w = images.shape
    padded = torch.nn.functional.pad(images, (padding,) * 4)  # (N, C, H + 2p, W + 2p)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
    rows = (dy.view(n, 1) + torch.arange(h)).view(n, 1, h, 1)  # (N, 1, H, 1)
    cols = (dx.view(n, 1) + torch.arange(w)).view(n, 1, 1, w)  # (N, 1, 1, W)
    batch = torch.arange(n).view(n, 1, 1, 1)
    channels = torch.arange(images.shape[1]).view(1, -1, 1, 1)
    return padded[batch, channels, rows, cols]


def augment(
    images: torch.Tensor, *, hflip: float, crop_padding: int, generator: torch.Generator
) -> torch.Tensor:
    """Training augmentation of a normalised batch: random shifts, then random mirroring."""
    return random_hflip(random_crop(images, crop_padding, generator), hflip, generator)
