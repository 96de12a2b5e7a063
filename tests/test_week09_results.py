"""The figures the week-9 README and common/kernels/README.md quote, read back from the committed JSON."""

from __future__ import annotations

import json

import pytest

from common.inference.speculative_benchmark import GRAPHED
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
    # The rounds' times: each generation's median time over its plain steps and over its rounds.
    new_tokens = spec["config"]["new_tokens"]
    plain = {f"{row['comparison']['baseline']['median_ms'] / new_tokens:.2f}" for row in rows}
    round_ms = {row["draft_len"]: row["comparison"]["candidate"]["median_ms"] / row["rounds"] for row in rows}
    assert plain == {"6.03"} and (
        f"a plain step takes 6.03 ms, a round {round_ms[1]:.2f} ms at k = 1, {round_ms[2]:.2f} ms at k = 2 "
        f"and {round_ms[4]:.2f} ms at k = 4" in readme
    )
    assert round_ms[2] > round_ms[4], "the README's point: a round of k = 2 costs more than one of k = 4"
    assert spec["machinery"] == GRAPHED
    w8a8 = _load("nvidia-h100-80gb-hbm3", "inference_w8a8.json")
    large = [f"{shape['speedup']:.2f}x" for shape in w8a8["shapes"] if shape["m"] >= 4096]
    assert f"{large[0]}, {large[1]} and {large[2]} bf16 cuBLAS" in readme
    assert w8a8["goal"]["met"] and "(bar 1.3x at M >= 4096: met)" in readme
    instructors = _text("assignments/week09_inference_algorithms/README.md")
    assert f"the reference reached {large[0]}, {large[1]} and {large[2]} at 4096³" in instructors
    starter_comment = _text("assignments/week09_inference_algorithms/src/fastinfer/w8a8.py")
    assert f"this path measured {min(large)} to {max(large)} cuBLAS's" in starter_comment


def _small_m_span(folder: str, against: str) -> str:
    """The range of the decode sweep's speedups at M <= 16 against one baseline, as the READMEs print it."""
    cases = _load(folder, "kernels_matmul_decode.json")["cases"]
    speedups = [c["speedup"] for c in cases if c["x"] <= 16 and c["label"].endswith(against)]
    return f"{min(speedups):.2f}x to {max(speedups):.2f}x"


@pytest.mark.parametrize(
    ("folder", "baselines"),
    [
        ("nvidia-h200", ("vs cuBLAS", "vs unsplit")),  # that sweep predates the tiled baseline
        ("nvidia-h100-80gb-hbm3", ("vs cuBLAS", "vs unsplit", "vs tiled")),
    ],
)
def test_the_decode_gemm_ranges_are_the_sweeps(folder: str, baselines: tuple[str, ...]) -> None:
    for path in ("week09_inference_algorithms/README.md", "common/kernels/README.md"):
        text = _text(path)
        for against in baselines:
            assert _small_m_span(folder, against) in text, (path, folder, against)
