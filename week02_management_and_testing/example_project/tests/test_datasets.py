"""The data: generated splits are deterministic and disjoint; CIFAR-10 is read from disk or refused clearly."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from classifier.data import cifar10_split, load_split, make_splits, synthetic_splits

from common.data import DatasetNotFoundError


def splits(seed: int) -> dict[str, dict[str, torch.Tensor]]:
    return synthetic_splits(20, 10, size=8, num_classes=4, noise=0.5, seed=seed)


def test_synthetic_splits_are_uint8_images_and_int64_labels() -> None:
    data = splits(0)
    assert data["train"]["images"].shape == (20, 3, 8, 8) and data["test"]["images"].shape == (10, 3, 8, 8)
    assert data["train"]["images"].dtype == torch.uint8 and data["train"]["labels"].dtype == torch.int64
    assert set(data["train"]["labels"].tolist()) <= {0, 1, 2, 3}


def test_synthetic_splits_depend_only_on_the_seed() -> None:
    first, again, other = splits(0), splits(0), splits(1)
    assert torch.equal(first["train"]["images"], again["train"]["images"])
    assert not torch.equal(first["train"]["images"], other["train"]["images"])


def test_no_test_image_is_a_train_image() -> None:
    data = splits(0)
    train = {image.numpy().tobytes() for image in data["train"]["images"]}
    assert not any(image.numpy().tobytes() in train for image in data["test"]["images"])


def write_fake_cifar10(root: Path, per_batch: int) -> None:
    """Tiny files in CIFAR-10's on-disk format (python pickles of uint8 rows), as common.data reads them."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, per_batch).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))


def test_cifar10_is_read_from_disk_and_limited(cfg, tmp_path: Path) -> None:
    write_fake_cifar10(tmp_path / "cifar", per_batch=4)
    assert cifar10_split(tmp_path / "cifar", train=False, limit=None)["images"].shape == (4, 3, 32, 32)
    cfg.data = {"name": "cifar10", "root": str(tmp_path / "cifar"), "num_train": 7, "num_test": None}
    data = make_splits(cfg.data, seed=0)
    assert len(data["train"]["labels"]) == 7 and len(data["test"]["labels"]) == 4


def test_missing_cifar10_says_what_to_put_where(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"cifar-10-batches-py/.*data=synthetic"):
        cifar10_split(tmp_path, train=True, limit=None)


def test_unknown_data_name_and_missing_split_are_clear_errors(cfg, tmp_path: Path) -> None:
    cfg.data.name = "imagenet"
    with pytest.raises(ValueError, match="data=synthetic or data=cifar10"):
        make_splits(cfg.data, seed=0)
    with pytest.raises(FileNotFoundError, match="run the prepare stage first"):
        load_split(tmp_path / "train.pt")
