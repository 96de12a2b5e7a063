"""The transforms: properties that hold for any batch (hypothesis), and the augmentations' randomness."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from classifier.transforms import augment, channel_stats, normalize, random_crop, random_hflip
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import array_shapes, arrays

# Any batch of uint8 images (N, C, H, W) of 1 to 6 pixels a side; deadline off: torch's first call is slow.
uint8_batches = arrays(np.uint8, array_shapes(min_dims=4, max_dims=4, min_side=1, max_side=6)).map(
    torch.from_numpy
)
seeds = st.integers(0, 2**32 - 1)


@settings(deadline=None, max_examples=50)
@given(uint8_batches)
def test_normalize_with_the_batchs_own_stats_centres_every_channel(images: torch.Tensor) -> None:
    mean, std = channel_stats(images)
    out = normalize(images, mean, std)
    assert out.dtype == torch.float32 and out.shape == images.shape
    channel_means = out.transpose(0, 1).reshape(images.shape[1], -1).mean(dim=1)
    torch.testing.assert_close(channel_means, torch.zeros_like(channel_means), atol=1e-4, rtol=0)
    # ...and it loses nothing: the pixels come back exactly.
    back = (out * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).round().to(torch.uint8)
    assert torch.equal(back, images)


def test_normalize_refuses_floats() -> None:
    with pytest.raises(TypeError, match="uint8"):
        normalize(torch.zeros(1, 3, 2, 2), torch.zeros(3), torch.ones(3))


@settings(deadline=None, max_examples=50)
@given(uint8_batches, seeds)
def test_hflip_with_p_1_mirrors_every_image_and_twice_is_the_identity(
    images: torch.Tensor, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    once = random_hflip(images, 1.0, g)
    assert torch.equal(once, images.flip(-1))
    assert torch.equal(random_hflip(once, 1.0, g), images)
    assert torch.equal(random_hflip(images, 0.0, g), images)


@settings(deadline=None, max_examples=50)
@given(uint8_batches, st.integers(0, 3), seeds)
def test_crop_is_a_shift_of_at_most_padding_pixels(images: torch.Tensor, padding: int, seed: int) -> None:
    """Every output image is its input shifted by some (dy, dx) in [-padding, padding]^2, zeros filled in."""
    out = random_crop(images, padding, torch.Generator().manual_seed(seed))
    assert out.shape == images.shape and out.dtype == images.dtype
    h, w = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (padding,) * 4)
    for image, shifted in zip(padded, out, strict=True):
        windows = [
            image[:, dy : dy + h, dx : dx + w]
            for dy in range(2 * padding + 1)
            for dx in range(2 * padding + 1)
        ]
        assert any(torch.equal(shifted, window) for window in windows)


# Testing randomness. A random transform is tested in two ways:
# 1. Exactly, at the edges where it is not random (p=0, p=1, above), and with a fixed seed for what must
#    be reproducible (below).
# 2. Statistically: over n independent draws, the count of flipped images is Binomial(n, p), with standard
#    deviation sqrt(n p (1 - p)). A tolerance of 5 standard deviations fails a correct transform with
#    probability below 1e-6 whatever the seed, so the seed can change without the test turning flaky, while a
#    wrong p (say, 1 - p where p is 0.1 or 0.9) misses by far more than 5 sigma at this n.
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_hflip_flips_a_fraction_p_within_binomial_tolerance(p: float) -> None:
    n = 4000
    images = (
        torch.arange(2, dtype=torch.uint8).view(1, 1, 1, 2).expand(n, 1, 1, 2)
    )  # [0, 1]: flipped is [1, 0]
    flipped = int((random_hflip(images, p, torch.Generator().manual_seed(0))[:, 0, 0, 0] == 1).sum())
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(flipped - n * p) < 5 * sigma, (
        f"{flipped} of {n} flipped, expected {n * p:.0f} ± {5 * sigma:.0f}"
    )


def test_augment_is_reproducible_from_its_seed(images: torch.Tensor) -> None:
    def run(seed: int) -> torch.Tensor:
        return augment(images, hflip=0.5, crop_padding=2, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.equal(run(1), run(2))
