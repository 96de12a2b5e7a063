"""Data for the course: synthetic datasets that behave like real ones, a padding collator, real-format loaders.

Synthetic data (no files, no downloads; deterministic per index, so DataLoader workers agree):

- `SyntheticImages`: images with learnable structure, for classification (oriented gratings) or
  segmentation (shapes with per-pixel masks).
- `SyntheticTokens`: token sequences whose lengths follow a long-tailed log-normal distribution, like the
  documents of a text corpus, with a learnable next-token rule of known entropy.
- `write_jpegs` + `JpegDataset`: photo-like JPEG files on disk and a dataset that decodes them, for
  measuring an input pipeline.

`pad_collate` pads a batch of sequences to its longest one (or to a fixed length, for comparison).

Real datasets in their original on-disk formats, downloaded only when asked (`download=True`):
`load_cifar10` (the python pickle batches) and `load_mnist` (idx ubyte files, optionally gzipped).
A missing dataset is an error that says how to get it; nothing falls back to synthetic data.
"""

from __future__ import annotations

import gzip
import io
import math
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from common.errors import EffdlError

__all__ = [
    "CIFAR10_CLASSES",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "ImageClassification",
    "JpegDataset",
    "SyntheticImages",
    "SyntheticTokens",
    "decode_jpeg_pil",
    "load_cifar10",
    "load_mnist",
    "pad_collate",
    "read_idx",
    "sample_lengths",
    "write_jpegs",
]


class DatasetNotFoundError(EffdlError, FileNotFoundError):
    """A real dataset's files are not on disk (and download=False)."""


class DatasetFormatError(EffdlError, ValueError):
    """A dataset file exists but is not in the expected format (truncated, wrong file, wrong version)."""


def _generator(seed: int, index: int) -> torch.Generator:
    # One stream per (seed, index): item i is the same whichever worker, epoch or order asks for it.
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


# ----------------------------------------------------------------------------------------------------
# Synthetic images
# ----------------------------------------------------------------------------------------------------


class SyntheticImages(Dataset):
    """n images of shape (channels, size, size), float32, roughly zero-mean and unit-variance.

    task="classification": item i is (image, label); class c is a sinusoidal grating at angle
        c * pi / num_classes with a class-specific tint, random phase and frequency, under Gaussian noise:
        a model must learn orientation, not a pixel value.
    task="segmentation": item i is (image, mask); the image holds 1-4 discs and rectangles on a textured
        background, mask[y, x] is the class of the shape covering the pixel (0: background, else
        1..num_classes-1), and each class has its own colour, blurred by noise.
    """

    def __init__(
        self,
        n: int,
        *,
        size: int = 32,
        num_classes: int = 10,
        channels: int = 3,
        task: Literal["classification", "segmentation"] = "classification",
        noise: float = 0.5,
        seed: int = 0,
    ) -> None:
        if n < 1 or size < 4 or channels < 1:
            raise ValueError(
                f"need n >= 1, size >= 4, channels >= 1; got n={n}, size={size}, channels={channels}"
            )
        if task not in ("classification", "segmentation"):
            raise ValueError(f"task must be 'classification' or 'segmentation', got {task!r}")
        if num_classes < 2:
            raise ValueError(
                f"num_classes must be >= 2 (segmentation counts the background), got {num_classes}"
            )
        self.n, self.size, self.num_classes, self.channels = n, size, num_classes, channels
        self.task, self.noise, self.seed = task, noise, seed
        # Class colours: fixed by the seed, shared by all items.
        self.colors = torch.randn(num_classes, channels, generator=_generator(seed, -1))
        coords = torch.linspace(-1, 1, size)
        self._yy, self._xx = torch.meshgrid(coords, coords, indexing="ij")

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} images")
        g = _generator(self.seed, index % self.n)
        if self.task == "classification":
            return self._grating(g)
        return self._shapes(g)

    def _grating(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        label = int(torch.randint(self.num_classes, (), generator=g))
        angle = label * math.pi / self.num_classes
        frequency = 3 + 3 * torch.rand((), generator=g)
        phase = 2 * math.pi * torch.rand((), generator=g)
        along = self._xx * math.cos(angle) + self._yy * math.sin(angle)
        wave = torch.sin(math.pi * frequency * along + phase)  # (size, size)
        tint = 1 + 0.3 * self.colors[label].view(-1, 1, 1)
        image = tint * wave + self.noise * torch.randn(self.channels, self.size, self.size, generator=g)
        return image, torch.tensor(label)

    def _shapes(self, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.zeros(self.size, self.size, dtype=torch.long)
        for _ in range(int(torch.randint(1, 5, (), generator=g))):
            cls = int(torch.randint(1, self.num_classes, (), generator=g))
            cy, cx = (torch.rand(2, generator=g) * 1.6 - 0.8).tolist()
            radius = float(0.15 + 0.35 * torch.rand((), generator=g))
            if torch.rand((), generator=g) < 0.5:
                inside = (self._yy - cy) ** 2 + (self._xx - cx) ** 2 < radius**2
            else:
                inside = ((self._yy - cy).abs() < radius) & ((self._xx - cx).abs() < 0.7 * radius)
            mask[inside] = cls  # later shapes cover earlier ones, like objects in front
        texture = 0.3 * torch.sin(7 * self._xx + 5 * self._yy + 6 * torch.rand((), generator=g))
        image = self.colors[mask].permute(2, 0, 1) + texture  # (channels, size, size)
        image = image + self.noise * torch.randn(self.channels, self.size, self.size, generator=g)
        return image, mask


# ----------------------------------------------------------------------------------------------------
# Synthetic token sequences
# ----------------------------------------------------------------------------------------------------


def sample_lengths(
    n: int,
    *,
    median: int = 256,
    sigma: float = 1.0,
    min_length: int = 8,
    max_length: int = 2048,
    seed: int = 0,
) -> np.ndarray:
    """n sequence lengths from a log-normal distribution, rounded and clipped to [min_length, max_length].

    Document lengths in text corpora are close to log-normal: most are short, a long tail is much longer
    (sigma=1: a tenth of the sequences are over 3.6x the median). sigma=0 gives every sequence the median.
    """
    if not 1 <= min_length <= median <= max_length:
        raise ValueError(
            f"need 1 <= min_length <= median <= max_length, got {min_length}, {median}, {max_length}"
        )
    if sigma < 0:
        raise ValueError(f"sigma must be >= 0, got {sigma}")
    rng = np.random.default_rng(seed)
    lengths = np.rint(median * np.exp(sigma * rng.standard_normal(n)))
    return np.clip(lengths, min_length, max_length).astype(np.int64)


class SyntheticTokens(Dataset):
    """n token sequences (int64 tensors of different lengths) from a vocabulary of vocab_size tokens.

    lengths: sample_lengths(n, ...), available without generating any sequence (as a real dataset would
    keep them in an index).
    Content: the first token is uniform; each next one is the previous plus a step drawn from a fixed,
    skewed distribution over a few offsets (mod vocab_size). A model that sees the previous token can
    predict the next with cross-entropy `entropy` nats at best; a model that can't, ln(vocab_size).
    """

    def __init__(
        self,
        n: int,
        *,
        vocab_size: int = 32_000,
        median_length: int = 256,
        sigma: float = 1.0,
        min_length: int = 8,
        max_length: int = 2048,
        num_steps: int = 8,
        seed: int = 0,
    ) -> None:
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2, got {vocab_size}")
        self.n, self.vocab_size, self.seed = n, vocab_size, seed
        self.lengths = sample_lengths(
            n, median=median_length, sigma=sigma, min_length=min_length, max_length=max_length, seed=seed
        )
        # Separate random streams (by the second entropy word): the step rule here, item i in __getitem__.
        rng = np.random.default_rng([seed, 1])
        self.step_values = rng.choice(
            np.arange(1, vocab_size), size=min(num_steps, vocab_size - 1), replace=False
        )
        weights = 1.0 / np.arange(1, len(self.step_values) + 1)  # Zipf-like: a few steps dominate
        self.step_probs = weights / weights.sum()

    @property
    def entropy(self) -> float:
        """The best achievable next-token cross-entropy (nats) for a model that sees the previous token."""
        return float(-(self.step_probs * np.log(self.step_probs)).sum())

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -self.n <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} sequences")
        index %= self.n
        rng = np.random.default_rng([self.seed, 2, index])
        length = int(self.lengths[index])
        steps = rng.choice(self.step_values, size=length - 1, p=self.step_probs)
        first = rng.integers(self.vocab_size)
        tokens = (first + np.concatenate([[0], np.cumsum(steps)])) % self.vocab_size
        return torch.from_numpy(tokens.astype(np.int64))


def pad_collate(
    batch: Sequence[torch.Tensor], *, pad_id: int = 0, pad_to: int | None = None
) -> dict[str, torch.Tensor]:
    """Stack 1-D sequences into a padded batch: pad to the longest sequence of this batch ("dynamic padding").

    pad_to: pad every batch to this fixed length instead (what a model with a fixed context does naively);
    every token beyond a sequence's end is wasted compute.
    Returns input_ids (B, L), attention_mask (B, L) bool (True on real tokens) and lengths (B,).
    Use as DataLoader(..., collate_fn=pad_collate) or functools.partial(pad_collate, pad_to=2048).
    """
    if len(batch) == 0:
        raise ValueError("pad_collate got an empty batch")
    for i, seq in enumerate(batch):
        if not isinstance(seq, torch.Tensor) or seq.dim() != 1:
            shape = tuple(seq.shape) if isinstance(seq, torch.Tensor) else type(seq).__name__
            raise TypeError(f"pad_collate expects 1-D tensors (one sequence each); item {i} is {shape}")
    lengths = torch.tensor([len(seq) for seq in batch], dtype=torch.long)
    longest = int(lengths.max())
    if pad_to is not None and longest > pad_to:
        raise ValueError(
            f"a sequence of length {longest} does not fit pad_to={pad_to}: truncate the sequences "
            "(e.g. seq[:pad_to]) or raise pad_to"
        )
    width = longest if pad_to is None else pad_to
    input_ids = torch.full((len(batch), width), pad_id, dtype=batch[0].dtype)
    for i, seq in enumerate(batch):
        input_ids[i, : len(seq)] = seq
    attention_mask = torch.arange(width) < lengths[:, None]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "lengths": lengths}


# ----------------------------------------------------------------------------------------------------
# JPEG files
# ----------------------------------------------------------------------------------------------------


def _photo_like(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """An RGB image with what photos have: smooth gradients, objects with edges, and sensor noise.

    Pure noise would compress badly and decode slowly; flat colour would be unrealistically cheap. Drawn
    with Pillow in uint8, which is several times faster than float tensor arithmetic at 512x512.
    """
    corners = rng.integers(0, 256, size=(2, 2, 3), dtype=np.uint8)
    image = Image.fromarray(corners, "RGB").resize((width, height), Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        radius = rng.uniform(0.05, 0.3) * min(height, width)
        color = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=color)
    noise = rng.integers(-8, 9, size=(height, width, 3), dtype=np.int16)  # sensor noise, std ~5 levels
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def write_jpegs(
    directory: str | Path,
    n: int,
    *,
    size: tuple[int, int] = (256, 256),
    quality: int = 90,
    subsampling: Literal["4:2:0", "4:4:4"] = "4:2:0",
    seed: int = 0,
) -> list[Path]:
    """Write n photo-like RGB JPEGs of size (height, width) into directory; return their paths, sorted.

    Files are named img_00000.jpg, ...; at 512x512 and quality 90 each is ~50 kB, like a web photo.
    subsampling: "4:2:0" stores colour at half resolution in each direction, as cameras and most JPEGs do;
    "4:4:4" keeps it at full resolution. Decoders differ in how they upsample 4:2:0 colour (nvJPEG: nearest
    neighbour; libjpeg-turbo: interpolated), so only 4:4:4 files decode to nearly the same pixels everywhere.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
    if subsampling not in ("4:2:0", "4:4:4"):
        raise ValueError(f"subsampling must be '4:2:0' or '4:4:4', got {subsampling!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    height, width = size
    paths = []
    for i in range(n):
        path = directory / f"img_{i:05d}.jpg"
        _photo_like(np.random.default_rng([seed, i]), height, width).save(
            path, format="JPEG", quality=quality, subsampling=subsampling
        )
        paths.append(path)
    return paths


def decode_jpeg_pil(data: bytes | torch.Tensor) -> torch.Tensor:
    """Decode JPEG bytes with Pillow into a uint8 (3, H, W) tensor (what most data pipelines do per image)."""
    if isinstance(data, torch.Tensor):
        data = data.numpy().tobytes()
    with Image.open(io.BytesIO(data)) as image:
        array = np.array(image.convert("RGB"))  # a writable copy: torch refuses read-only memory
    return torch.from_numpy(array).permute(2, 0, 1)


class JpegDataset(Dataset):
    """JPEG files as a dataset: item i is (decoded uint8 (3, H, W) image, or transform of it; label).

    decoder: "pil" (Pillow) or "torchvision" (torchvision.io.decode_jpeg on the CPU, libjpeg-turbo).
    labels: one int per file (default: all 0). The file is read and decoded on every access, as a pipeline
    over a dataset too large to keep in memory does.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | None = None,
        *,
        decoder: Literal["pil", "torchvision"] = "pil",
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if decoder not in ("pil", "torchvision"):
            raise ValueError(f"decoder must be 'pil' or 'torchvision', got {decoder!r}")
        if labels is not None and len(labels) != len(paths):
            raise ValueError(f"{len(labels)} labels for {len(paths)} files")
        self.paths = [Path(p) for p in paths]
        self.labels = list(labels) if labels is not None else [0] * len(self.paths)
        self.decoder, self.transform = decoder, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.paths[index]
        if self.decoder == "pil":
            image = decode_jpeg_pil(path.read_bytes())
        else:
            import torchvision.io  # here, not at the top: importing torchvision takes seconds

            image = torchvision.io.decode_jpeg(
                torchvision.io.read_file(str(path)), mode=torchvision.io.ImageReadMode.RGB
            )
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


# ----------------------------------------------------------------------------------------------------
# Real datasets in their original formats
# ----------------------------------------------------------------------------------------------------

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
_CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
_CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
_CIFAR10_DIR = "cifar-10-batches-py"

# The original host (yann.lecun.com) often refuses downloads; torchvision's mirror is tried first.
_MNIST_MIRRORS = ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/")
_MNIST_FILES = {  # file name -> md5 of the .gz
    "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
}


@dataclass
class ImageClassification(Dataset):
    """Images and labels held in memory: item i is (image, label), image uint8 (C, H, W) or transform(image).

    source says where the data came from (dataset, split, path), so a notebook can print what it trains on.
    """

    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # int64 (N,)
    classes: tuple[str, ...]
    source: str
    transform: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.images.dim() != 4 or len(self.images) != len(self.labels):
            raise ValueError(
                f"need images (N, C, H, W) and labels (N,), got {tuple(self.images.shape)} and "
                f"{tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])


def _not_found(name: str, root: Path, missing: Path, how: str) -> DatasetNotFoundError:
    return DatasetNotFoundError(
        f"{name} not found: {missing} does not exist. Pass download=True to download it into {root} "
        f"({how}), or point root at a folder that already holds it."
    )


def load_cifar10(root: str | Path, *, train: bool = True, download: bool = False) -> ImageClassification:
    """CIFAR-10 from root/cifar-10-batches-py (data_batch_1..5 for train, test_batch for test).

    The files are the original python pickles: dicts with b"data" (N, 3072) uint8, channel-major rows of
    32x32 pixels, and b"labels". Pickle can run code while loading: use files from the official archive
    (download=True checks its md5) or that you made yourself.
    download: fetch and unpack the 163 MB archive from the official site first, if the folder is missing.
    """
    root = Path(root)
    folder = root / _CIFAR10_DIR
    if not folder.is_dir() and download:
        from torchvision.datasets.utils import download_and_extract_archive

        download_and_extract_archive(_CIFAR10_URL, str(root), md5=_CIFAR10_MD5)
    names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
    images, labels = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise _not_found("CIFAR-10", root, path, "163 MB from www.cs.toronto.edu")
        with open(path, "rb") as f:
            try:
                batch = pickle.load(f, encoding="bytes")
            except (pickle.UnpicklingError, EOFError, ValueError) as err:
                raise DatasetFormatError(
                    f"{path} is not a CIFAR-10 pickle batch ({err}); re-download it"
                ) from err
        if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
            raise DatasetFormatError(f"{path}: expected a dict with b'data' and b'labels', re-download it")
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(batch[b"labels"]):
            raise DatasetFormatError(
                f"{path}: data has shape {data.shape} for {len(batch[b'labels'])} labels; "
                "expected (N, 3072) with one label per row"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.extend(batch[b"labels"])
    split = "train" if train else "test"
    return ImageClassification(
        images=torch.from_numpy(np.concatenate(images)),
        labels=torch.tensor(labels, dtype=torch.long),
        classes=CIFAR10_CLASSES,
        source=f"CIFAR-10 {split}, {len(labels)} images from {folder}",
    )


# idx type byte -> numpy dtype (big-endian where multi-byte), from the format's description.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an idx file (MNIST's format), gzipped if the name ends in .gz.

    Layout: two zero bytes, a type byte (0x08: uint8, ...), the number of dimensions, then each dimension
    as a big-endian int32, then the data in C order.
    """
    path = Path(path)
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetFormatError(
            f"{path} is not an idx file (bad magic number {raw[:4].hex()}); re-download it"
        )
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise DatasetFormatError(
            f"{path}: header says shape {shape} ({expected} bytes of data), file has {len(raw) - offset}; "
            "the file is truncated or corrupt, re-download it"
        )
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)


def _find_mnist_file(root: Path, name: str) -> Path | None:
    # Files may sit in root itself or where torchvision.datasets.MNIST keeps them, gzipped or not.
    for folder in (root, root / "MNIST" / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _download_mnist(root: Path, name: str) -> None:
    from torchvision.datasets.utils import download_url

    errors = []
    for mirror in _MNIST_MIRRORS:
        try:
            download_url(f"{mirror}{name}.gz", str(root), md5=_MNIST_FILES[name])
            return
        except Exception as err:  # try the next mirror; report all failures together
            errors.append(f"{mirror}: {type(err).__name__}: {err}")
    raise DatasetNotFoundError(f"could not download {name}.gz from any mirror:\n  " + "\n  ".join(errors))


def load_mnist(root: str | Path, *, train: bool = True, download: bool = False) -> ImageClassification:
    """MNIST from its original idx files in root (or root/MNIST/raw), gzipped or not.

    train: train-images-idx3-ubyte + train-labels-idx1-ubyte (60,000 images), else t10k-* (10,000).
    download: fetch the missing .gz files (11 MB in all) first, with their md5 checked.
    Images come back as uint8 (N, 1, 28, 28).
    """
    root = Path(root)
    prefix = "train" if train else "t10k"
    found = {}
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{prefix}-{kind}"
        path = _find_mnist_file(root, name)
        if path is None and download:
            root.mkdir(parents=True, exist_ok=True)
            _download_mnist(root, name)
            path = _find_mnist_file(root, name)
        if path is None:
            raise _not_found("MNIST", root, root / f"{name}.gz", "11 MB from a public mirror")
        found[kind] = path
    images = read_idx(found["images-idx3-ubyte"])
    labels = read_idx(found["labels-idx1-ubyte"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetFormatError(
            f"MNIST files disagree: images {images.shape} (expected (N, 28, 28)), labels {labels.shape} "
            f"(expected (N,)) in {found['images-idx3-ubyte'].parent}"
        )
    return ImageClassification(
        images=torch.from_numpy(images.astype(np.uint8)).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        classes=tuple(str(d) for d in range(10)),
        source=f"MNIST {'train' if train else 'test'}, {len(labels)} images from {found['images-idx3-ubyte'].parent}",
    )
