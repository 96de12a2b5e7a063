"""The figures the week-9 README and common/kernels/README.md quote, read back from the committed JSON."""

from __future__ import annotations

import json

from common.weeks import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"


def _text(path: str) -> str:
    """The file's prose with its line breaks and indentation folded into single spaces."""
    return " ".join((REPO_ROOT / path).read_text().split())


def _load(folder: str, name: str) -> dict:
    return json.loads((RESULTS / folder / name).read_text())


def test_the_speculative_and_w8a8_figures_are_the_h100_runs() -> None:
    readme = _text("week09_inference_algorithms/README.md")
    spec = _load("nvidia-h100-80gb-hbm3", "inference_speculative.json")
    rows, goal = spec["draft_lengths"], spec["goal"]
    assert f"alpha {spec['alpha']:.3f}" in readme
    assert (
        f"{goal['speedup']:.2f}x plain decoding's tokens/s at the best k ({goal['best_draft_len']})" in readme
    )
    assert not goal["met"] and all(row["identical_tokens"] for row in rows)
    gap = max(abs(row["tokens_per_round"] - row["predicted_tokens_per_round"]) for row in rows)
    assert gap <= 0.15 and "within 0.15 of the formula" in readme
    w8a8 = _load("nvidia-h100-80gb-hbm3", "inference_w8a8.json")
    large = [f"{shape['speedup']:.2f}x" for shape in w8a8["shapes"] if shape["m"] >= 4096]
    assert f"{large[0]}, {large[1]} and {large[2]} bf16 cuBLAS" in readme
    assert not w8a8["goal"]["met"]


def test_the_decode_gemm_ranges_are_the_h200_sweep() -> None:
    cases = _load("nvidia-h200", "kernels_matmul_decode.json")["cases"]

    def span(against: str) -> str:
        speedups = [c["speedup"] for c in cases if c["x"] <= 16 and c["label"].endswith(against)]
        return f"{min(speedups):.2f}x to {max(speedups):.2f}x"

    for path in ("week09_inference_algorithms/README.md", "common/kernels/README.md"):
        text = _text(path)
        assert span("vs cuBLAS") in text and span("vs unsplit") in text, path
