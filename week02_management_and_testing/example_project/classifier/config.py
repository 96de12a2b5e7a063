"""The configuration: Hydra composes conf/config.yaml with a data group and command-line overrides."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def load_config(overrides: list[str] | None = None) -> DictConfig:
    """The composed configuration, as `python -m classifier.train KEY=VALUE...` would see it.

    For tests and notebooks, which call the stages' functions instead of their command lines.
    """
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])
