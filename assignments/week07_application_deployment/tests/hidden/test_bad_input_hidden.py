"""Task bad_input: each kind of bad request gets its 4xx with a JSON reason, and the service goes on serving."""

from __future__ import annotations

import io

import numpy as np
import served
from PIL import Image

from common.grading.client import Submission

MAX_IMAGE_BYTES = 2048  # the known 16x16 PNGs are under 1 KB


def noise_png(size: int) -> bytes:
    """A PNG of random pixels: it does not compress, so it is about 3 * size * size bytes."""
    pixels = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_requests_get_their_4xx_and_the_service_still_serves(
    submission: Submission, model, known
) -> None:
    png, _ = known[0]
    with served.running(submission, model[0], "--max-image-bytes", str(MAX_IMAGE_BYTES)) as server:
        cases = {
            "a file that is not an image": (server.predict(b"this is not an image"), 400),
            "the image in field 'file' instead of 'image'": (server.predict(png, field="file"), 400),
            "the PNG as the raw body (Content-Type image/png)": (
                server.request("POST", "/predict", content=png, headers={"content-type": "image/png"}), 415),
            "an image above --max-image-bytes": (server.predict(noise_png(64)), 413),
        }  # fmt: skip
        after = server.predict(png)
    for what, (response, status) in cases.items():
        assert response.status_code == status, f"{what}: answered {response.status_code}, expected {status}"
        body = (
            response.json()
            if response.headers.get("content-type", "").startswith("application/json")
            else None
        )
        assert type(body) is dict and type(body.get("error")) is str and body["error"], (
            f'{what}: the answer must be JSON {{"error": "<reason>"}}, got {response.text[:120]!r}'
        )
    assert after.status_code == 200, f"after the bad requests, a good one answered {after.status_code}"
