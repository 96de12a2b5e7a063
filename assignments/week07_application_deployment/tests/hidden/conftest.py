"""Fixtures of the hidden tests: the model file and the known images, made here once per checker process."""

from __future__ import annotations

import numpy as np
import pytest
import reference


@pytest.fixture(scope="session")
def model() -> tuple[bytes, np.ndarray]:
    """(the model file, its centroids), fitted here in milliseconds."""
    return reference.model_file_bytes()


@pytest.fixture(scope="session")
def known() -> list[tuple[bytes, int]]:
    """32 (PNG, true class) pairs the model was not fitted on."""
    return reference.known_images(32)
