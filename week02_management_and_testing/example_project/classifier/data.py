"""The images: generated ones (the default) or CIFAR-10 from disk, stored as uint8 tensors per split.

Both sources give the same format: images uint8 (N, 3, H, W) and labels int64 (N,), so everything after
`prepare` is the same whichever one is in use.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from common.data import DatasetNotFoundError, SyntheticImages, load_cifar10

Split = dict[str, torch.Tensor]  # {"images": uint8 (N, 3, H, W), "labels": int64 (N,)}


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Roughly unit-variance float images to uint8 pixels around 128, as a camera would store them."""
    return (images * 48 + 128).round().clamp(0, 255).to(torch.uint8)


def synthetic_splits(
    num_train: int, num_test: int, *, size: int, num_classes: int, noise: float, seed: int
) -> dict[str, Split]:
    """Oriented gratings (class c at angle c*pi/num_classes), the same for the same arguments.

    Train and test come from one generated set (its class colours depend on the seed): items
    0..num_train-1 train, the next num_test test, so no test image is a copy of a train image.
    """
    n = num_train + num_test
    dataset = SyntheticImages(n, size=size, num_classes=num_classes, noise=noise, seed=seed)
    images, labels = zip(*(dataset[i] for i in range(n)), strict=True)
    images, labels = to_uint8(torch.stack(images)), torch.stack(labels)
    return {
        "train": {"images": images[:num_train], "labels": labels[:num_train]},
        "test": {"images": images[num_train:], "labels": labels[num_train:]},
    }


def cifar10_split(root: str | Path, *, train: bool, limit: int | None) -> Split:
    """CIFAR-10's train or test split from root/cifar-10-batches-py; never downloads."""
    try:
        dataset = load_cifar10(root, train=train, download=False)
    except DatasetNotFoundError as error:
        raise DatasetNotFoundError(
            f"data=cifar10 reads the CIFAR-10 python batches from {Path(root)}/cifar-10-batches-py/ "
            "(data_batch_1..5, test_batch), but they are not there. Unpack cifar-10-python.tar.gz "
            "(https://www.cs.toronto.edu/~kriz/cifar.html) into that folder, point data.root at a folder "
            "that holds it, or use the generated data (data=synthetic)."
        ) from error
    images, labels = dataset.images, dataset.labels
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return {"images": images.contiguous(), "labels": labels}


def make_splits(cfg: DictConfig, seed: int) -> dict[str, Split]:
    """The train and test splits that `cfg.data` describes."""
    if cfg.name == "synthetic":
        shape = {"size": cfg.size, "num_classes": cfg.num_classes, "noise": cfg.noise}
        return synthetic_splits(cfg.num_train, cfg.num_test, **shape, seed=seed)
    if cfg.name == "cifar10":
        return {
            "train": cifar10_split(cfg.root, train=True, limit=cfg.num_train),
            "test": cifar10_split(cfg.root, train=False, limit=cfg.num_test),
        }
    raise ValueError(f"unknown data.name {cfg.name!r}: use data=synthetic or data=cifar10")


def save_split(split: Split, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(split, path)


def load_split(path: Path) -> Split:
    """A split written by `prepare`; says which stage to run when it is missing."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the prepare stage first (`dvc repro prepare`)")
    return torch.load(path, weights_only=True)
