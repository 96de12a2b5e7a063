"""The figures the week-9 README, slides, common/kernels/README.md and the speculative benchmark's docstring
quote, read back from the committed JSON (or, for model sizes, computed from the benchmark's config)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from common.inference import speculative_benchmark
from common.inference.quantization_benchmark import LAYOUTS, QUANTIZED_LAYOUT
from common.inference.speculative_benchmark import GRAPHED, SpeculativeBenchmark
from common.models.llama import count_parameters
from common.weeks import REPO_ROOT

RESULTS = REPO_ROOT / "benchmarks" / "results"
SPECULATIVE_RUNS = ("inference_speculative.json", "inference_speculative_fp32_draft.json")  # bf16, fp32 draft


def _text(path: str) -> str:
    """The file's prose with its line breaks and indentation folded into single spaces."""
    return " ".join((REPO_ROOT / path).read_text().split())


def _load(folder: str, name: str) -> dict:
    return json.loads((RESULTS / folder / name).read_text())


def test_the_speculative_and_w8a8_figures_are_the_h100_runs() -> None:
    readme = _text("week09_inference_algorithms/README.md")
    spec = _load("nvidia-h100-80gb-hbm3", "inference_speculative.json")
    rows, goal = spec["draft_lengths"], spec["goal"]
    assert spec["config"]["draft_dtype"] == "bfloat16" and "The draft runs in bf16" in readme
    assert f"alpha {spec['alpha']:.3f}" in readme
    assert (
        f"{goal['speedup']:.2f}x plain decoding's tokens/s at the best k ({goal['best_draft_len']})" in readme
    )
    assert goal["met"] and "the bar of 2.0x is met on this GPU" in readme
    slides = _text("week09_inference_algorithms/lecture/slides.md")
    assert (
        f"{goal['speedup']:.2f}× at $k = {goal['best_draft_len']}$ (goal ≥ 2.0×), the same tokens" in slides
    )
    assert all(row["identical_tokens"] for row in rows) and "the same tokens as plain decoding" in readme
    gap = max(abs(row["tokens_per_round"] - row["predicted_tokens_per_round"]) for row in rows)
    assert f"Tokens per round lie within {gap:.2f} of the formula" in readme
    fp32 = _load("nvidia-h100-80gb-hbm3", "inference_speculative_fp32_draft.json")
    assert fp32["config"]["draft_dtype"] == "float32"
    assert f"fp32 the run beside it reached {fp32['goal']['speedup']:.2f}x at its best k" in readme
    # The rounds' times: each generation's median time over its plain steps and over its rounds.
    new_tokens = spec["config"]["new_tokens"]
    plain = [row["comparison"]["baseline"]["median_ms"] / new_tokens for row in rows]
    round_ms = {row["draft_len"]: row["comparison"]["candidate"]["median_ms"] / row["rounds"] for row in rows}
    assert (
        f"a plain step takes {min(plain):.2f} to {max(plain):.2f} ms, a round {round_ms[2]:.2f} ms at k = 2, "
        f"{round_ms[4]:.2f} ms at k = 4, {round_ms[5]:.2f} ms at k = 5 and {round_ms[6]:.2f} ms at k = 6"
        in readme
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


def test_the_speculative_benchmarks_docstring_states_its_models_and_the_h100_runs() -> None:
    doc = " ".join(speculative_benchmark.__doc__.split())
    bench = SpeculativeBenchmark()
    target = count_parameters(bench.target)
    draft = count_parameters(replace(bench.target, n_layers=bench.draft_layers))
    assert f"{target / 1e9:.2f} billion parameters, {target * 4 / 1e9:.0f} GB in fp32" in doc
    assert f"{draft / 1e9:.2f} billion parameters, {draft / target:.2f} of the target's" in doc
    assert f"run in bf16, {draft * 2 / (target * 4):.2f} of its bytes" in doc
    bf16, fp32 = (_load("nvidia-h100-80gb-hbm3", name) for name in SPECULATIVE_RUNS)
    assert bf16["config"]["draft_dtype"] == "bfloat16" and fp32["config"]["draft_dtype"] == "float32"
    best = bf16["goal"]
    assert f"reached {best['speedup']:.2f}x plain decoding at k = {best['best_draft_len']}" in doc
    assert f"and {fp32['goal']['speedup']:.2f}x at its best k with the same draft in fp32" in doc
    assert f"(alpha {bf16['alpha']:.3f} in bf16 against {fp32['alpha']:.3f} in fp32)" in doc


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


def test_the_quantization_figures_are_the_h100_run() -> None:
    readme = _text("week09_inference_algorithms/README.md")
    slides = _text("week09_inference_algorithms/lecture/slides.md")
    record = _load("nvidia-h100-80gb-hbm3", "inference_quantization.json")
    speed, errors = record["speed"], record["error"]
    methods = speed["methods"]
    int8 = methods["int8"]
    assert speed["model"]["preset"] == "8b" and speed["model"]["n_layers"] == 4
    assert "decoding 4 layers of Llama-3-8B's shape (the `8b` preset)" in readme
    # The run the text describes: the output layer quantized, the quantized models in QUANTIZED_LAYOUT, and
    # the baseline the fastest of LAYOUTS, each quoted against the first.
    assert record["config"]["include_output"] is True and "the output layer included" in readme
    assert speed["quantized_layout"] == QUANTIZED_LAYOUT == "merged projections, attention as reductions"
    reference, *others = LAYOUTS
    assert reference == "separate projections, sdpa attention" and list(speed["baseline_layouts"]) == others
    ratios = {layout: comparison["speedup"] for layout, comparison in speed["baseline_layouts"].items()}
    assert speed["baseline_layout"] == max(ratios, key=ratios.get) and ratios[speed["baseline_layout"]] > 1.0
    assert speed["baseline_layout"] == "merged projections, attention as reductions"
    assert (
        f"merged projections with SDPA {ratios['merged projections, sdpa attention']:.2f}x, merged with attention "
        f"as reductions {ratios['merged projections, attention as reductions']:.2f}x, the one kept" in readme
    )
    assert f"merged with reductions at {ratios[speed['baseline_layout']]:.2f}x separate projections" in slides
    assert record["goal"]["met"] and int8["speedup"] >= record["goal"]["value"] == 1.5
    comparison = int8["comparison"]
    assert comparison["speedup_p20"] >= 1.5 and int8["speedup"] < 1.55, "met, narrowly"
    assert (
        f"weight-only int8 decodes at {int8['speedup']:.2f}x bf16's tokens/s at batch 1 (bar 1.5x: met, narrowly: "
        f"the 20th to 80th percentiles of its paired ratios are {comparison['speedup_p20']:.2f}x to "
        f"{comparison['speedup_p80']:.2f}x)" in readme
    )
    names = {"int4": "int4", "fp8-tensor": "fp8 with one scale per tensor", "fp8-row": "per row"}
    for method, words in names.items():
        assert f"{words} {methods[method]['speedup']:.2f}x" in readme, method
    assert f"SmoothQuant's fake-quantized W8A8 {methods['smoothquant']['speedup']:.2f}x" in readme
    fraction = int8["weight_bytes"] / speed["baseline_weight_bytes"]
    assert f"its weights {fraction:.2f} of bf16's bytes (the embedding table stays bf16)" in readme
    assert (
        f"4 layers of this shape, q|k|v and gate|up merged: int8 {int8['speedup']:.2f}× bf16's tokens/s"
        in slides
    )
    assert f"int8 {int8['speedup']:.2f}x, int4 {methods['int4']['speedup']:.2f}x, fp8 per tensor" in slides
    assert f"int8 decoded at {int8['speedup']:.2f}x bf16's tokens/s, just over the 1.5x goal" in slides
    assert f"int8 {int8['speedup']:.2f}× (goal ≥ 1.5×: met), int4 {methods['int4']['speedup']:.2f}×" in slides
    # What a step streams: every weight but the (untied, bf16) embedding table, of which it reads one row.
    embedding = speed["model"]["vocab_size"] * speed["model"]["d_model"] * 2
    bf16_bytes, int8_bytes = speed["baseline_weight_bytes"] - embedding, int8["weight_bytes"] - embedding
    bf16_rate = bf16_bytes * int8["baseline_tokens_per_s"] / 1e12
    int8_rate = int8_bytes * int8["tokens_per_s"] / 1e12
    assert f"the bf16 model streams its {bf16_bytes / 1e9:.2f} GB at {bf16_rate:.2f} TB/s" in readme
    assert f"and int8 its {int8_bytes / 1e9:.2f} GB at {int8_rate:.2f} TB/s" in readme
    assert f"is {int8_bytes / bf16_bytes:.2f} as many bytes in int8 as in bf16" in slides
    assert f"yet it decodes at {int8['speedup']:.2f}x, not {bf16_bytes / int8_bytes:.2f}x" in slides
    assert f"streams its weights at {int8_rate:.2f} TB/s, the bf16 one at {bf16_rate:.2f}." in slides
    assert (
        round(int8_bytes / bf16_bytes, 2) == 0.5
        and f"half the bytes give {int8['speedup']:.2f}x, not 2x" in readme
    )
    losses = {m: v["loss"] for m, v in errors["methods"].items()}
    assert (
        f"the held-out loss is bf16's ({errors['baseline']['loss']:.3f}) for every method but int4 " in readme
    )
    assert {m for m, loss in losses.items() if loss != errors["baseline"]["loss"]} == {"int4"}
    assert f"for every method but int4 ({losses['int4']:.3f})" in readme


def test_the_h100_decode_sweep_kept_the_splits_the_readmes_name() -> None:
    """The timed split's choices at M <= 16 (the `S=` of each label) and the tiled-kernel goal's count."""
    cases = _load("nvidia-h100-80gb-hbm3", "kernels_matmul_decode.json")["cases"]
    small = [c for c in cases if c["x"] <= 16]
    splits = {(c["label"].split()[0], c["x"]): int(c["label"].split("S=")[1].split()[0]) for c in small}
    assert {key: s for key, s in splits.items() if s != 1} == {("attn_o", 2): 8}
    readme, kernels = _text("week09_inference_algorithms/README.md"), _text("common/kernels/README.md")
    assert "kept one slice everywhere at M <= 16 except the output projection at M = 2 (8 slices)" in readme
    assert "kept one slice for every shape but the output projection at M = 2 (8 slices)" in kernels
    tiled = [g["met"] for c in small if c["label"].endswith("vs tiled") for g in c["goals"]]
    assert f"met at {sum(tiled)} of {len(tiled)} points" in readme
    slides = _text("week09_inference_algorithms/lecture/slides.md")
    span = _small_m_span("nvidia-h100-80gb-hbm3", "vs tiled").replace("x", "×")
    missed = len(tiled) - sum(tiled)
    assert f"{span} at $M \\le 16$ (goal ≥ 1.2×: one point of {len(tiled)} under)" in slides and missed == 1


def test_the_int8_decode_kernel_table_is_the_h100_run() -> None:
    """common/kernels/README.md's int8 table: each weight's row of speed-ups, in the order M = 1, 2, 4, 8."""
    record = _load("nvidia-h100-80gb-hbm3", "kernels_int8_matmul.json")
    text = _text("common/kernels/README.md")
    rows: dict[str, list[dict]] = {}
    for case in record["cases"]:
        rows.setdefault(case["label"].split(" M=")[0], []).append(case)
    assert len(rows) == 3 and all(len(cases) == 4 for cases in rows.values())
    for label, cases in rows.items():
        name, shape = label.rsplit(" ", 1)
        first, *rest = cases
        goal = first["goals"][0]
        words = "met" if goal["met"] else f"missed by {(1 - first['speedup'] / goal['value']):.1%}"
        speedup = f"{first['speedup']:.2f}x"
        others = " | ".join(f"{case['speedup']:.2f}x" for case in rest)
        assert f"| {name}, {shape.replace('x', ' x ')} | {speedup} (" in text, label
        assert f"{words}) | {others} |" in text, label
    ones = [cases[0] for cases in rows.values()]
    fractions = [case["ours"]["frac_measured_bw"] for case in ones]
    assert f"at {100 * min(fractions):.0f} to {max(fractions):.0%} of the copy bandwidth" in text
    square = rows["attention out 4096x4096"][0]
    assert f"{square['baseline']['median_ms']:.4f} ms for cuBLAS's 4096 x 4096 against" in text
    assert f"{square['ours']['median_ms']:.4f} ms for ours" in text
    by_rows = [[cases[i]["speedup"] for cases in rows.values()] for i in range(4)]  # M = 1, 2, 4, 8
    ranges = [f"{min(speedups):.2f}x to {max(speedups):.2f}x" for speedups in by_rows]
    for path in ("week09_inference_algorithms/README.md", "week09_inference_algorithms/lecture/slides.md"):
        assert f"{ranges[0]} cuBLAS" in _text(path), path
    assert f"At 4 rows the kernel is at best even ({ranges[2]})" in text
    assert f"at 8, where cuBLAS still makes one pass with tensor cores, it runs at {ranges[3]}" in text
    comment = " ".join(
        line.strip().lstrip("# ")
        for line in (REPO_ROOT / "common/inference/quantization.py").read_text().splitlines()
        if line.startswith("#")
    )
    assert f"one row ran at {ranges[0]}, two at {ranges[1]}, four at {ranges[2]}" in comment
