"""The checker's own model arithmetic and image set, for the expected answers.

Nothing here comes from the submission (the checker never imports it). The known images are week 7's
gratings with their labels (`week07_application_deployment.images.example_images`); the model file is written
here in the format the course's loader reads (`modelserver/model.py`: centroids, temperature, classes,
image_size), fitted from training images of another seed; the expected probabilities are computed here, in
float64, from the PNG bytes decoded here.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from common.data import SyntheticImages
from week07_application_deployment.images import class_names, example_images, to_pixels

NUM_CLASSES = 4
IMAGE_SIZE = 16
TEMPERATURE = 0.1
TRAIN_SEED, KNOWN_SEED = 0, 10_000  # the known images are never fitted on


def _features(pixels: np.ndarray) -> np.ndarray:
    """(B, 3, S, S) uint8 -> (B, 2): the structure tensor's orientation, (gxx - gyy, 2 gxy) / (gxx + gyy)."""
    gray = pixels.astype(np.float64).mean(axis=1)
    gx = gray[:, 1:, 1:] - gray[:, 1:, :-1]
    gy = gray[:, 1:, 1:] - gray[:, :-1, 1:]
    xx, yy, xy = ((a * b).mean(axis=(1, 2)) for a, b in ((gx, gx), (gy, gy), (gx, gy)))
    return np.stack([xx - yy, 2 * xy], axis=1) / (xx + yy + 1e-6)[:, None]


def model_file_bytes() -> tuple[bytes, np.ndarray]:
    """(the model file, its centroids): each class's mean feature over 256 training images."""
    data = SyntheticImages(256, size=IMAGE_SIZE, num_classes=NUM_CLASSES, seed=TRAIN_SEED)
    images, labels = zip(*(data[i] for i in range(len(data))), strict=True)
    features = _features(to_pixels(torch.stack(images)).numpy())
    labels_np = torch.stack(labels).numpy()
    centroids = np.stack([features[labels_np == c].mean(axis=0) for c in range(NUM_CLASSES)])
    state = {
        "centroids": torch.tensor(centroids, dtype=torch.float32),
        "temperature": TEMPERATURE,
        "classes": class_names(NUM_CLASSES),
        "image_size": IMAGE_SIZE,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue(), centroids.astype(np.float32).astype(np.float64)


def known_images(n: int) -> list[tuple[bytes, int]]:
    """n (PNG bytes, true class) pairs the model was not fitted on."""
    return example_images(n, num_classes=NUM_CLASSES, size=IMAGE_SIZE, seed=KNOWN_SEED)


def expected_probabilities(pngs: list[bytes], centroids: np.ndarray) -> list[dict[str, float]]:
    """Each image's class probabilities: softmax of minus the distance to each centroid over TEMPERATURE."""
    pixels = np.stack(
        [np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).transpose(2, 0, 1) for png in pngs]
    )
    distances = np.linalg.norm(_features(pixels)[:, None, :] - centroids[None], axis=2)  # (B, classes)
    logits = -distances / TEMPERATURE
    probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    names = class_names(NUM_CLASSES)
    return [dict(zip(names, map(float, row), strict=True)) for row in probabilities]
