"""Images in and out of the service: example PNGs of known class, and the checked decoding of uploads.

The classes are common.data.SyntheticImages' gratings (class c: stripes at angle c * 180° / num_classes, with
a class tint, random phase and frequency, under noise): the model must learn orientation. The service reads
image files, so a float grating becomes 8-bit RGB pixels by the fixed map `to_pixels`; the exported model
takes those uint8 pixels and normalises them itself, so nothing but decoding happens before it.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from common.data import SyntheticImages
from common.errors import EffdlError

__all__ = ["ImageRejected", "class_names", "decode_image", "encode_png", "example_images", "to_pixels"]

PIXEL_SCALE = 48.0  # a unit-variance grating spans about ±2.7 sigma of 0..255 around 128


def class_names(num_classes: int) -> list[str]:
    """Class c is a grating at angle c * 180 / num_classes degrees: "angle-000", "angle-045", ..."""
    return [f"angle-{round(c * 180 / num_classes):03d}" for c in range(num_classes)]


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """Float images (..., 3, H, W), about zero-mean and unit-variance, as uint8 pixels."""
    return (images * PIXEL_SCALE + 128).round().clamp(0, 255).to(torch.uint8)


def encode_png(pixels: torch.Tensor) -> bytes:
    """uint8 (3, H, W) pixels as PNG file bytes."""
    buffer = io.BytesIO()
    Image.fromarray(pixels.permute(1, 2, 0).contiguous().numpy(), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def example_images(n: int, *, num_classes: int, size: int, seed: int) -> list[tuple[bytes, int]]:
    """n (PNG bytes, label) pairs; a seed other than the training seed gives images the model never saw."""
    data = SyntheticImages(n, size=size, num_classes=num_classes, seed=seed)
    return [(encode_png(to_pixels(image)), int(label)) for image, label in (data[i] for i in range(n))]


class ImageRejected(EffdlError, ValueError):
    """An upload the service refuses, with the HTTP status that says why (413 too large, 422 unreadable)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes, *, size: int, max_pixels: int) -> torch.Tensor:
    """Image file bytes (any format PIL reads) -> uint8 (3, size, size) RGB pixels, resized if needed.

    The pixel count is checked from the header before anything is decoded: a small file can declare a huge
    image (a "decompression bomb") whose decoding would take the server's memory.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageRejected(413, f"the image is too large to decode: {error}") from None
    except (OSError, ValueError):
        raise ImageRejected(
            422, f"the uploaded file ({len(data):,} bytes) is not an image that PIL can read (PNG, JPEG, ...)"
        ) from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageRejected(
            413,
            f"the image is {width}x{height} = {width * height:,} pixels; this server takes at most "
            f"{max_pixels:,} pixels (--max-pixels); send a smaller image",
        )
    try:
        image = image.convert("RGB")  # decodes now: truncated or corrupt data fails here
    except (OSError, ValueError) as error:
        raise ImageRejected(422, f"the image file is truncated or corrupt: {error}") from None
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # (3, size, size) uint8
