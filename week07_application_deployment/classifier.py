"""The served model: an exported program (torch.export) loaded without the code that defined or trained it.

The file that `python -m week07_application_deployment.train` writes is self-contained: the graph, the
weights, and a JSON description of its contract stored beside them (`torch.export.save(extra_files=...)`):

    {"classes": ["angle-000", ...], "image_size": 32, "input": "uint8 (batch, 3, size, size) RGB",
     "output": "probabilities (batch, classes)", "batch": {"min": 1, "max": 1024}, "train": {...}}

Loading it needs torch and this file only, which is what a serving image should contain.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.errors import EffdlError

__all__ = ["META_FILE", "Classifier", "ModelFileError", "Prediction", "load_classifier"]

META_FILE = "effdl_classifier.json"


class ModelFileError(EffdlError):
    """The model file is missing or is not an exported classifier of this week."""


@dataclass(frozen=True)
class Prediction:
    """One image's answer: the most probable class and every class's probability."""

    label: str
    probabilities: dict[str, float]


class Classifier:
    """An exported classifier and its contract; predict() runs one forward pass for a list of images."""

    def __init__(self, program: torch.export.ExportedProgram, meta: dict[str, Any]) -> None:
        self.module = program.module()
        self.meta = meta
        self.classes: list[str] = list(meta["classes"])
        self.image_size: int = int(meta["image_size"])
        self.max_batch: int = int(meta["batch"]["max"])

    def predict(self, images: list[torch.Tensor]) -> list[Prediction]:
        """uint8 (3, size, size) images -> one Prediction each, from one forward pass."""
        if len(images) > self.max_batch:
            raise ValueError(
                f"{len(images)} images in one batch; the exported model takes at most {self.max_batch}"
            )
        with torch.inference_mode():
            probabilities = self.module(torch.stack(images)).tolist()  # (batch, classes)
        return [
            Prediction(
                label=self.classes[max(range(len(row)), key=row.__getitem__)],
                probabilities=dict(zip(self.classes, row, strict=True)),
            )
            for row in probabilities
        ]


def load_classifier(path: str | Path) -> Classifier:
    """Load an exported classifier file; a clear error if it is missing or not one."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(
            f"no model file at {path}; make one with "
            f"`python -m week07_application_deployment.train --out {path}`"
        )
    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():  # torch reads the weights from a read-only buffer and says so
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            program = torch.export.load(path, extra_files=extra)
    except Exception as error:  # torch raises several types for a file that is not an exported program
        raise ModelFileError(f"{path} is not a torch.export file: {error}") from None
    if not extra[META_FILE]:
        raise ModelFileError(f"{path} is an exported program without {META_FILE}: not a week-7 classifier")
    return Classifier(program, json.loads(extra[META_FILE]))
