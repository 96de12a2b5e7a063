"""Stage 1, prepare: make or read the images and store the train and test splits under paths.data."""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from classifier.data import make_splits, save_split


def run(cfg: DictConfig) -> dict[str, int]:
    """Write paths.data/{train,test}.pt; returns the number of images in each."""
    splits = make_splits(cfg.data, seed=cfg.seed)
    for name, split in splits.items():
        save_split(split, Path(cfg.paths.data) / f"{name}.pt")
    sizes = {name: len(split["labels"]) for name, split in splits.items()}
    print(f"prepared {cfg.data.name} data in {cfg.paths.data}: {sizes}")
    return sizes


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
