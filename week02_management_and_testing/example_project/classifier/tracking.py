"""Weights & Biases: one run per stage, offline unless asked otherwise, saved under the project's outputs.

An offline run writes everything (config, metrics, images, tables) to a folder and needs no account or
network; `wandb sync FOLDER` uploads it later. `wandb.mode=disabled` turns every call into a no-op.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import wandb
from omegaconf import DictConfig, OmegaConf


def start_run(cfg: DictConfig, job_type: str) -> wandb.Run:
    """A W&B run for one stage, with the whole resolved configuration as its hyper-parameters."""
    Path(cfg.wandb.dir).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        project=cfg.wandb.project,
        group=cfg.wandb.group,
        job_type=job_type,
        mode=cfg.wandb.mode,
        dir=cfg.wandb.dir,
        config=OmegaConf.to_container(cfg, resolve=True),
        # silent: this module prints the one line that matters; console off: stdout is not copied into
        # the run; no git: the project may live in a folder without one.
        settings=wandb.Settings(silent=True, console="off", disable_git=True),
    )


def run_folder(run: wandb.Run) -> Path | None:
    """The folder an offline run writes to (what `wandb sync` takes), or None for a disabled run."""
    if run.disabled or not run.dir:
        return None
    return Path(os.path.relpath(Path(run.dir).parent))  # run.dir is the run's files/ subfolder


def finish(run: wandb.Run) -> Path | None:
    """Close the run; for an offline run, print where it is and how to upload it. Returns its folder."""
    folder = run_folder(run)
    offline = run.settings.mode == "offline"
    run.finish()
    if offline and folder is not None:
        print(f"W&B run saved offline in {folder}; upload it later with: wandb sync {folder}")
    return folder


def save_metrics(cfg: DictConfig, stage: str, metrics: dict[str, float]) -> Path:
    """Write a stage's metrics to paths.metrics/STAGE.json, the file dvc.yaml declares as its metrics."""
    path = Path(cfg.paths.metrics) / f"{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")
    return path


def image_grid(images: torch.Tensor, columns: int = 8, scale: int = 4) -> wandb.Image:
    """uint8 (N, C, H, W) images as one picture, `columns` wide, each enlarged `scale` times to stay visible."""
    images = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    images = torch.nn.functional.pad(images, (1, 1, 1, 1), value=255)  # a white line between images
    n, c, h, w = images.shape
    rows = -(-n // columns)
    padded = torch.cat([images, images.new_full((rows * columns - n, c, h, w), 255)])  # fill the last row
    grid = padded.view(rows, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(rows * h, columns * w, c)
    return wandb.Image(grid.numpy())
