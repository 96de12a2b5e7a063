"""common.data: synthetic datasets, the padding collator, and loaders of the real on-disk formats.

The CIFAR-10 and MNIST tests write tiny files in the original formats into tmp_path; nothing downloads.
"""

from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import DataLoader

from common import data
from common.data import DatasetFormatError, DatasetNotFoundError

# ----------------------------------------------------------------------------------------------------
# Synthetic images
# ----------------------------------------------------------------------------------------------------


def test_synthetic_images_are_deterministic_per_index() -> None:
    a, b = data.SyntheticImages(20, seed=3), data.SyntheticImages(20, seed=3)
    for i in (0, 7, 19):
        assert torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1]
        assert torch.equal(a[i][0], a[i][0])
    assert torch.equal(a[-1][0], a[19][0])
    assert not torch.equal(a[0][0], data.SyntheticImages(20, seed=4)[0][0])
    with pytest.raises(IndexError, match="out of range"):
        a[20]


def test_synthetic_classification_images_and_labels() -> None:
    ds = data.SyntheticImages(200, size=24, num_classes=5, channels=3)
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    labels = torch.stack([ds[i][1] for i in range(len(ds))])
    assert images.shape == (200, 3, 24, 24) and images.dtype == torch.float32
    assert labels.dtype == torch.long and set(labels.tolist()) == set(range(5))  # every class appears
    assert abs(images.mean().item()) < 0.1 and 0.5 < images.std().item() < 1.5  # roughly normalised


def test_synthetic_classes_differ_in_orientation() -> None:
    """A grating's power spectrum peaks along its orientation: per-class spectra must differ."""
    ds = data.SyntheticImages(400, size=32, num_classes=4, noise=0.0)
    spectra = {c: [] for c in range(4)}
    for i in range(len(ds)):
        image, label = ds[i]
        spectra[int(label)].append(torch.fft.fft2(image.mean(0)).abs())
    mean = {c: torch.stack(s).mean(0) for c, s in spectra.items()}
    for c in range(4):
        for d in range(c + 1, 4):
            cos = (mean[c] * mean[d]).sum() / (mean[c].norm() * mean[d].norm())
            assert cos < 0.9, f"classes {c} and {d} have near-identical spectra (cosine {cos:.2f})"


def test_synthetic_segmentation_masks_mark_where_the_shapes_are() -> None:
    ds = data.SyntheticImages(50, size=32, num_classes=4, task="segmentation", noise=0.1)
    seen = set()
    for i in range(len(ds)):
        image, mask = ds[i]
        assert mask.shape == (32, 32) and mask.dtype == torch.long
        assert 0 <= mask.min() and mask.max() < 4
        seen |= set(mask.unique().tolist())
        # Pixels of class c have class c's colour, up to the texture (amplitude 0.3) and the noise.
        for c in mask.unique().tolist():
            pixels = image[:, mask == c]
            assert (pixels.mean(1) - ds.colors[c]).abs().max() < 0.35
    assert seen == {0, 1, 2, 3}


def test_synthetic_images_checks_arguments() -> None:
    with pytest.raises(ValueError, match="task must be"):
        data.SyntheticImages(4, task="detection")
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        data.SyntheticImages(4, num_classes=1)


def test_dataloader_workers_see_the_same_items() -> None:
    ds = data.SyntheticImages(16, size=8)
    direct = torch.stack([ds[i][0] for i in range(16)])
    loaded = torch.cat([x for x, _ in DataLoader(ds, batch_size=4, num_workers=2)])
    assert torch.equal(direct, loaded)


# ----------------------------------------------------------------------------------------------------
# Token sequences and padding
# ----------------------------------------------------------------------------------------------------


def test_sample_lengths_are_log_normal_and_clipped() -> None:
    lengths = data.sample_lengths(40_000, median=200, sigma=1.0, min_length=8, max_length=4096, seed=1)
    assert lengths.dtype == np.int64 and lengths.min() >= 8 and lengths.max() <= 4096
    # Median within 3% (its standard error at n=40,000 is ~0.6%).
    assert abs(np.median(lengths) / 200 - 1) < 0.03
    # The tail: P(L > 200 * e^1.2816) = P(Z > 1.2816) = 10% for a log-normal with sigma 1; the standard
    # error of the fraction at n=40,000 is 0.15%, so 1% is a wide margin.
    tail = (lengths > 200 * math.exp(1.2816)).mean()
    assert abs(tail - 0.10) < 0.01
    assert (data.sample_lengths(10, median=64, sigma=0.0, min_length=8, max_length=128) == 64).all()
    clipped = data.sample_lengths(1000, median=100, sigma=3.0, min_length=50, max_length=150)
    assert (clipped == 50).any() and (clipped == 150).any()


def test_sample_lengths_checks_arguments() -> None:
    with pytest.raises(ValueError, match="min_length <= median <= max_length"):
        data.sample_lengths(10, median=10, min_length=20, max_length=40)
    with pytest.raises(ValueError, match="sigma"):
        data.sample_lengths(10, sigma=-1)


def test_synthetic_tokens_follow_their_lengths_vocabulary_and_next_token_rule() -> None:
    ds = data.SyntheticTokens(300, vocab_size=1000, median_length=64, max_length=512, seed=2)
    steps = []
    for i in range(len(ds)):
        seq = ds[i]
        assert seq.dtype == torch.long and len(seq) == ds.lengths[i]
        assert 0 <= seq.min() and seq.max() < 1000
        steps.append(((seq[1:] - seq[:-1]) % 1000).numpy())
    steps = np.concatenate(steps)
    assert set(np.unique(steps)) <= set(ds.step_values.tolist())
    # The empirical entropy of the steps estimates `entropy` (the best achievable loss); with ~20k samples
    # of an 8-value distribution the estimate is within ~0.01 nats.
    _, counts = np.unique(steps, return_counts=True)
    p = counts / counts.sum()
    assert abs(-(p * np.log(p)).sum() - ds.entropy) < 0.02
    assert ds.entropy < math.log(1000) / 2
    assert torch.equal(
        ds[5], data.SyntheticTokens(300, vocab_size=1000, median_length=64, max_length=512, seed=2)[5]
    )


def test_pad_collate_matches_pad_sequence() -> None:
    seqs = [torch.randint(1, 50, (n,)) for n in (5, 1, 9, 3)]
    batch = data.pad_collate(seqs, pad_id=0)
    assert torch.equal(batch["input_ids"], pad_sequence(seqs, batch_first=True, padding_value=0))
    assert batch["lengths"].tolist() == [5, 1, 9, 3]
    assert batch["attention_mask"].sum(1).tolist() == [5, 1, 9, 3]
    assert torch.equal(batch["input_ids"][batch["attention_mask"]], torch.cat(seqs))

    fixed = data.pad_collate(seqs, pad_id=-1, pad_to=16)
    assert fixed["input_ids"].shape == (4, 16) and (fixed["input_ids"][~fixed["attention_mask"]] == -1).all()
    assert torch.equal(fixed["input_ids"][:, :9], pad_sequence(seqs, batch_first=True, padding_value=-1))


def test_pad_collate_errors() -> None:
    with pytest.raises(ValueError, match="length 9 does not fit pad_to=4"):
        data.pad_collate([torch.ones(9, dtype=torch.long)], pad_to=4)
    with pytest.raises(TypeError, match="1-D tensors.*item 1 is \\(2, 2\\)"):
        data.pad_collate([torch.ones(3), torch.ones(2, 2)])
    with pytest.raises(ValueError, match="empty batch"):
        data.pad_collate([])


# ----------------------------------------------------------------------------------------------------
# JPEG files
# ----------------------------------------------------------------------------------------------------


def test_write_jpegs_writes_decodable_photo_like_files(tmp_path: Path) -> None:
    paths = data.write_jpegs(tmp_path / "jpegs", 3, size=(48, 64), quality=85, seed=1)
    assert [p.name for p in paths] == ["img_00000.jpg", "img_00001.jpg", "img_00002.jpg"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (64, 48) and image.mode == "RGB"
    again = data.write_jpegs(tmp_path / "again", 3, size=(48, 64), quality=85, seed=1)
    assert [p.read_bytes() for p in paths] == [p.read_bytes() for p in again]
    with pytest.raises(ValueError, match="quality"):
        data.write_jpegs(tmp_path, 1, quality=0)
    with pytest.raises(ValueError, match="subsampling"):
        data.write_jpegs(tmp_path, 1, subsampling="4:1:1")
    full_colour = data.write_jpegs(tmp_path / "444", 1, size=(48, 64), subsampling="4:4:4", seed=1)
    with Image.open(full_colour[0]) as image444, Image.open(paths[0]) as image420:
        # Pillow reports the sampling factors of the luma component: (1, 1) for 4:4:4, (2, 2) for 4:2:0.
        assert image444.layer[0][1:3] == (1, 1) and image420.layer[0][1:3] == (2, 2)


def test_jpeg_dataset_decoders_agree(tmp_path: Path) -> None:
    paths = data.write_jpegs(tmp_path, 4, size=(40, 56))
    pil = data.JpegDataset(paths, labels=[0, 1, 2, 3], decoder="pil")
    tv = data.JpegDataset(paths, decoder="torchvision", transform=lambda x: x.float() / 255)
    for i in range(4):
        a, label = pil[i]
        b, _ = tv[i]
        assert a.shape == (3, 40, 56) and a.dtype == torch.uint8 and label == i
        # Both use libjpeg(-turbo), but builds may pick different IDCT / chroma upsampling: allow a few
        # levels per pixel, and almost none on average.
        diff = (a.float() / 255 - b).abs() * 255
        assert diff.max() <= 8 and diff.mean() < 1
    with pytest.raises(ValueError, match="decoder must be"):
        data.JpegDataset(paths, decoder="opencv")
    with pytest.raises(ValueError, match="3 labels for 4 files"):
        data.JpegDataset(paths, labels=[0, 1, 2])


# ----------------------------------------------------------------------------------------------------
# CIFAR-10: python pickle batches
# ----------------------------------------------------------------------------------------------------


def _write_cifar_batch(path: Path, rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[int]]:
    rows = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).tolist()
    batch = {
        b"batch_label": path.name.encode(),
        b"labels": labels,
        b"data": rows,
        b"filenames": [f"img_{i}.png".encode() for i in range(n)],
    }
    path.write_bytes(pickle.dumps(batch, protocol=2))
    return rows, labels


@pytest.fixture
def cifar_root(tmp_path: Path) -> tuple[Path, dict[str, tuple[np.ndarray, list[int]]]]:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = {
        name: _write_cifar_batch(folder / name, rng, 3) for name in [f"data_batch_{i}" for i in range(1, 6)]
    }
    written["test_batch"] = _write_cifar_batch(folder / "test_batch", rng, 2)
    return tmp_path, written


def test_load_cifar10_reads_the_pickle_batches(cifar_root) -> None:
    root, written = cifar_root
    train = data.load_cifar10(root)
    assert len(train) == 15 and train.images.shape == (15, 3, 32, 32) and train.images.dtype == torch.uint8
    rows = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each 32 rows of 32 pixels.
    for i, c, y, x in [(0, 0, 0, 0), (4, 1, 5, 31), (14, 2, 31, 7)]:
        assert train.images[i, c, y, x].item() == rows[i, c * 1024 + y * 32 + x]
    assert train.labels.tolist() == labels
    assert train.classes[3] == "cat" and "train" in train.source and str(root) in train.source
    image, label = train[4]
    assert torch.equal(image, train.images[4]) and label == labels[4]

    test = data.load_cifar10(root, train=False)
    assert len(test) == 2 and test.labels.tolist() == written["test_batch"][1] and "test" in test.source


def test_load_cifar10_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match=r"data_batch_1 does not exist.*download=True"):
        data.load_cifar10(tmp_path)


def test_load_cifar10_rejects_files_in_another_format(cifar_root) -> None:
    root, _ = cifar_root
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DatasetFormatError, match="not a CIFAR-10 pickle batch"):
        data.load_cifar10(root, train=False)
    (root / "cifar-10-batches-py" / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(DatasetFormatError, match=r"expected \(N, 3072\)"):
        data.load_cifar10(root, train=False)


# ----------------------------------------------------------------------------------------------------
# MNIST: idx ubyte files
# ----------------------------------------------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    """The idx encoding: 0, 0, type byte (0x08 = ubyte), ndim, big-endian int32 dims, then the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder: Path, prefix: str, n: int, gz: bool, rng: np.random.Generator):
    folder.mkdir(parents=True, exist_ok=True)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for name, array in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
        raw = _idx_bytes(array)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return images, labels


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "plain"])
def test_load_mnist_reads_idx_files(tmp_path: Path, gz: bool) -> None:
    rng = np.random.default_rng(1)
    images, labels = _write_mnist(tmp_path, "train", 5, gz, rng)
    test_images, test_labels = _write_mnist(tmp_path, "t10k", 3, gz, rng)
    train = data.load_mnist(tmp_path)
    assert train.images.shape == (5, 1, 28, 28) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images[:, 0].numpy(), images) and train.labels.tolist() == labels.tolist()
    test = data.load_mnist(tmp_path, train=False)
    assert (
        np.array_equal(test.images[:, 0].numpy(), test_images)
        and test.labels.tolist() == test_labels.tolist()
    )
    assert "MNIST test, 3 images" in test.source


def test_load_mnist_finds_torchvisions_layout(tmp_path: Path) -> None:
    _, labels = _write_mnist(tmp_path / "MNIST" / "raw", "t10k", 4, True, np.random.default_rng(2))
    assert data.load_mnist(tmp_path, train=False).labels.tolist() == labels.tolist()


def test_read_idx_rejects_bad_magic_and_truncated_files(tmp_path: Path) -> None:
    good = _idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4))
    (tmp_path / "ok").write_bytes(good)
    assert np.array_equal(data.read_idx(tmp_path / "ok"), np.arange(12).reshape(3, 4))
    (tmp_path / "magic").write_bytes(b"\x01" + good[1:])
    with pytest.raises(DatasetFormatError, match="bad magic number"):
        data.read_idx(tmp_path / "magic")
    (tmp_path / "short").write_bytes(good[:-1])
    with pytest.raises(DatasetFormatError, match=r"shape \(3, 4\).*truncated"):
        data.read_idx(tmp_path / "short")


def test_load_mnist_missing_files_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(
        DatasetNotFoundError, match=r"train-images-idx3-ubyte.gz does not exist.*download=True"
    ):
        data.load_mnist(tmp_path)


def test_image_classification_applies_its_transform() -> None:
    ds = data.ImageClassification(
        images=torch.zeros(2, 1, 4, 4, dtype=torch.uint8),
        labels=torch.tensor([3, 1]),
        classes=("a", "b", "c", "d"),
        source="test",
        transform=lambda x: x.float() + 1,
    )
    image, label = ds[1]
    assert image.dtype == torch.float32 and (image == 1).all() and label == 1
    with pytest.raises(ValueError, match=r"images \(N, C, H, W\)"):
        data.ImageClassification(torch.zeros(2, 4, 4), torch.zeros(2), (), "bad")


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("subsampling", "tolerance"),
    [
        # Full-resolution colour: only the IDCTs' rounding differs, well under one level on average.
        ("4:4:4", 1.0),
        # Half-resolution colour: nvJPEG upsamples it nearest-neighbour, libjpeg-turbo interpolates, so pixels
        # at colour edges move by several levels; torchvision's own test allows a mean of 2 on photos, and our
        # images have more colour edges and noise than most photos.
        ("4:2:0", 3.0),
    ],
)
def test_gpu_batch_decoding_matches_cpu_decoding(tmp_path: Path, subsampling: str, tolerance: float) -> None:
    import torchvision.io

    paths = data.write_jpegs(tmp_path, 8, size=(240, 320), quality=90, subsampling=subsampling)
    encoded = [torchvision.io.read_file(str(p)) for p in paths]
    gpu = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device="cuda")
    for path, decoded in zip(paths, gpu, strict=True):
        cpu = data.decode_jpeg_pil(path.read_bytes())
        assert decoded.device.type == "cuda" and decoded.shape == cpu.shape == (3, 240, 320)
        assert (decoded.cpu().float() - cpu.float()).abs().mean() < tolerance
