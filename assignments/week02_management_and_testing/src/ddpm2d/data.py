"""The data set: points on two interleaved half-moons, generated from a seed (nothing is downloaded).

`python -m ddpm2d.data --params params.yaml --out data/points.npy` is the pipeline's first stage: it reads
the `prepare` section of the parameters and writes a float32 array of shape (n, 2). NumPy only, so the stage
starts in a fraction of a second.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml


def make_points(n: int, seed: int, noise: float = 0.05) -> np.ndarray:
    """`n` points of two interleaved half-moons with Gaussian jitter `noise`, centred and scaled to unit
    variance per coordinate; float32, shape (n, 2). The same (n, seed, noise) always gives the same points."""
    if n < 2:
        raise ValueError(f"n must be at least 2 (one point per moon), got {n}")
    rng = np.random.default_rng(seed)
    upper = n // 2
    angles = rng.uniform(0.0, np.pi, size=n)
    points = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    points[upper:] = np.stack([1.0 - np.cos(angles[upper:]), 0.5 - np.sin(angles[upper:])], axis=1)
    points += rng.normal(0.0, noise, size=points.shape)
    points = (points - points.mean(axis=0)) / points.std(axis=0)
    return points.astype(np.float32)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the two-moons points (the `prepare` stage).")
    parser.add_argument(
        "--params", type=Path, default=Path("params.yaml"), help="its `prepare` section: n, seed"
    )
    parser.add_argument("--out", type=Path, default=Path("data/points.npy"), help="where to write the points")
    args = parser.parse_args(argv)
    params = yaml.safe_load(args.params.read_text())["prepare"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, make_points(int(params["n"]), int(params["seed"])))


if __name__ == "__main__":
    main()
