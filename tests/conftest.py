"""Shared pytest configuration: `gpu` tests skip cleanly where there is no CUDA GPU."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run `pytest -m gpu` on a GPU runner")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
