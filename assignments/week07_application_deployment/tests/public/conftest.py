"""Make `modelserver` importable from this assignment's src/ folder; the model and images the tests share."""

import sys
from pathlib import Path

import pytest
import torch

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from modelserver.model import Classifier, fit_classifier  # noqa: E402

from common.data import SyntheticImages  # noqa: E402
from week07_application_deployment.images import class_names, example_images, to_pixels  # noqa: E402

SIZE, CLASSES = 16, 4


@pytest.fixture(scope="session")
def classifier() -> Classifier:
    """The course's model fitted on 256 gratings (closed form: milliseconds)."""
    data = SyntheticImages(256, size=SIZE, num_classes=CLASSES, seed=0)
    images, labels = zip(*(data[i] for i in range(len(data))), strict=True)
    return fit_classifier(to_pixels(torch.stack(images)), torch.stack(labels), class_names(CLASSES))


@pytest.fixture(scope="session")
def pngs() -> list[bytes]:
    """8 PNG images of gratings the model was not fitted on, each different from the others."""
    return [png for png, _ in example_images(8, num_classes=CLASSES, size=SIZE, seed=10_000)]
