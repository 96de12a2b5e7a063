"""common.inference.speculative_benchmark: its models, its checks, its arithmetic, and its quick run.

The draft is checked against the target's own first layers run by hand; the greedy check against tokens
known to be (or not to be) the model's choices; tokens/s and the goal against times given here. The quick
run on the CPU checks the saved record's layout and that speculative decoding gave plain decoding's tokens.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from inference_toys import random_llama, random_prompt

from common.bench import Comparison, result_from_times, speedup_summary
from common.hardware import NoGPUError
from common.inference.generate import generate
from common.inference.speculative import SpeculativeStats
from common.inference.speculative_benchmark import (
    GOAL_SPEEDUP,
    GRAPHED,
    SpeculativeBenchmark,
    build_models,
    draft_length_row,
    greedy_violations,
    layer_draft,
    measure,
    quiet_late_layers,
    run_speculative_benchmark,
    speedup_goal,
)
from common.models.llama import LlamaConfig, count_parameters

DEEP = LlamaConfig(vocab_size=32, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=48)


def test_the_draft_is_the_targets_first_layers_with_its_head() -> None:
    target = random_llama(0, DEEP)
    draft = layer_draft(target, 2)
    tokens = random_prompt(DEEP, 2, 10)
    with torch.no_grad():  # the target's embedding, first two blocks, final norm and output, by hand
        x = target.tok_embeddings(tokens)
        for block in target.layers[:2]:
            x = block(x, target.rope_cos[:10], target.rope_sin[:10])
        expected = target.output(target.norm(x))
        assert torch.equal(draft(tokens), expected)  # the same operations on the same weights
    assert (
        draft.config.n_layers == 2
        and draft.tok_embeddings.weight.data_ptr() != target.tok_embeddings.weight.data_ptr()
    )


@pytest.mark.parametrize("n_layers", [0, 4])
def test_a_draft_must_be_a_strict_prefix_of_the_layers(n_layers: int) -> None:
    with pytest.raises(ValueError, match=r"n_layers=\d must be in \[1, 3\]"):
        layer_draft(random_llama(0, DEEP), n_layers)


def test_quiet_late_layers_scales_only_the_later_layers_residual_outputs() -> None:
    model = random_llama(0, DEEP)
    before = {name: p.clone() for name, p in model.named_parameters()}
    quiet_late_layers(model, keep=1, scale=0.25)
    for name, param in model.named_parameters():
        layer = int(name.split(".")[1]) if name.startswith("layers.") else None
        scaled = (
            layer is not None
            and layer >= 1
            and name.endswith(("attention.wo.weight", "feed_forward.w2.weight"))
        )
        assert torch.equal(param, before[name] * 0.25 if scaled else before[name]), name


def test_greedy_violations_finds_exactly_the_tokens_that_are_not_the_argmax() -> None:
    model = random_llama(1, DEEP)
    prompt = random_prompt(DEEP, 1, 5, seed=2)
    tokens = generate(model, prompt, 12)
    assert greedy_violations(model, tokens, prompt_len=5) == []
    wrong = tokens.clone()
    with torch.no_grad():
        logits = model(wrong[:, :8])[0, -1]
    wrong[0, 8] = logits.argmin()  # the worst choice at position 8: generated token 3
    assert greedy_violations(model, wrong, prompt_len=5)[:1] == [3]
    gap = (logits.max() - logits.min()).item()
    assert greedy_violations(model, wrong[:, :9], prompt_len=5, near_tie=2 * gap) == []  # within a "tie"


def comparison(baseline_ms: list[float], candidate_ms: list[float]) -> Comparison:
    sides = [
        result_from_times(name, times, timer="perf_counter", cache="warm")
        for name, times in (("plain", baseline_ms), ("speculative", candidate_ms))
    ]
    return Comparison(*sides, **speedup_summary(baseline_ms, candidate_ms))


def test_a_draft_lengths_row_is_tokens_per_second_of_the_medians_and_the_formula() -> None:
    compared = comparison([100.0, 120.0, 110.0], [50.0, 40.0, 55.0])
    stats = SpeculativeStats(rounds=10, drafted=40, accepted=28)
    row = draft_length_row(4, compared, stats, alpha=0.8, new_tokens=128, identical=True)
    assert row["plain_tokens_per_s"] == pytest.approx(128 / 0.110)  # medians: 110 ms and 50 ms
    assert row["speculative_tokens_per_s"] == pytest.approx(128 / 0.050)
    assert row["speedup"] == pytest.approx(2.0)  # per-pair ratios 2, 3, 2: their median, not 110 / 50
    assert row["tokens_per_round"] == pytest.approx((28 + 10) / 10)
    assert row["predicted_tokens_per_round"] == pytest.approx(sum(0.8**i for i in range(5)))
    assert row["acceptance_rate"] == pytest.approx(28 / 40) and row["identical_tokens"] is True


def test_the_goal_is_the_best_draft_lengths_speedup() -> None:
    rows = [{"draft_len": k, "speedup": s} for k, s in ((1, 1.4), (4, GOAL_SPEEDUP + 0.1), (8, 1.9))]
    goal = speedup_goal(rows)
    assert goal["best_draft_len"] == 4 and goal["met"] is True and goal["value"] == GOAL_SPEEDUP
    assert speedup_goal(rows[:1])["met"] is False


def test_the_default_models_are_the_sizes_the_docstring_gives() -> None:
    """3.51 billion parameters in the target (14 GB in fp32), 0.23 billion in its one-layer draft."""
    target = SpeculativeBenchmark().target
    assert (
        round(count_parameters(target) / 1e9, 2) == 3.51 and round(4 * count_parameters(target) / 1e9) == 14
    )
    assert round(count_parameters(replace(target, n_layers=1)) / 1e9, 2) == 0.23


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"draft_layers": 4}, "strict prefix"),
        ({"draft_lens": ()}, "one or more lengths"),
        ({"draft_lens": (0, 2)}, "one or more lengths"),
        ({"new_tokens": 60}, "exceed the target's max_seq_len=64"),
        ({"late_layer_scale": 0.0}, r"in \(0, 1\]"),
        ({"draft_dtype": "int8"}, "floating-point torch dtype"),
        ({"draft_dtype": "bfloat"}, "floating-point torch dtype"),
    ],
)
def test_a_bad_configuration_is_refused_with_the_reason(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replace(SpeculativeBenchmark.quick(), **changes)


@pytest.mark.parametrize(("draft_dtype", "expected"), [(None, torch.bfloat16), ("float64", torch.float64)])
def test_the_draft_runs_in_its_dtype_and_the_target_in_fp32(
    draft_dtype: str | None, expected: torch.dtype
) -> None:
    bench = SpeculativeBenchmark.quick()
    if draft_dtype is not None:
        bench = replace(bench, draft_dtype=draft_dtype)
    target, draft = build_models(bench, torch.device("cpu"))
    assert {p.dtype for p in target.parameters()} == {torch.float32}
    assert {p.dtype for p in draft.parameters()} == {expected}
    # The draft's weights are the target's, rounded once to the draft's dtype.
    assert torch.equal(draft.layers[0].attention.wq.weight, target.layers[0].attention.wq.weight.to(expected))


def test_tf32_matmuls_are_refused_with_the_fix() -> None:
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        with pytest.raises(ValueError, match=r'set_float32_matmul_precision\("highest"\)'):
            measure(SpeculativeBenchmark.quick(), torch.device("cpu"))
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_full_benchmark_needs_a_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the full run would run")
    with pytest.raises(NoGPUError, match="--quick"):
        run_speculative_benchmark(Path("unused"), quick=False)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models, op by op: a second thread only waits, long on a busy runner
    try:
        (path,) = run_speculative_benchmark(tmp_path_factory.mktemp("speculative"), quick=True)
    finally:
        torch.set_num_threads(threads)
    assert path.name == "inference_speculative_quick.json"
    return json.loads(path.read_text())


def test_the_quick_run_records_every_draft_length_with_plain_decodings_tokens(saved: dict) -> None:
    bench = SpeculativeBenchmark.quick()
    assert saved["quick"] is True and saved["benchmark"] == "inference_speculative"
    assert "device" in saved["environment"] and saved["config"]["draft_lens"] == list(bench.draft_lens)
    assert 0 <= saved["alpha"] <= 1
    for row, k in zip(saved["draft_lengths"], bench.draft_lens, strict=True):
        assert row["draft_len"] == k
        assert row["identical_tokens"] is True  # fp32 on a CPU: no near-tie between the two forwards here
        # A round emits 1 to k + 1 tokens, so the rounds are between new_tokens / (k + 1) and new_tokens.
        assert bench.new_tokens / (k + 1) <= row["rounds"] <= bench.new_tokens
        assert 1 <= row["tokens_per_round"] <= k + 1 and 1 <= row["predicted_tokens_per_round"] <= k + 1
        compared = row["comparison"]
        assert row["speedup"] == compared["speedup"] > 0
        assert row["plain_tokens_per_s"] == pytest.approx(
            bench.new_tokens / (compared["baseline"]["median_ms"] / 1e3)
        )
    assert saved["goal"]["best_draft_len"] in bench.draft_lens


@pytest.mark.gpu
def test_the_quick_run_on_a_gpu_compiles_and_keeps_the_tokens_gpu(tmp_path) -> None:
    """On a GPU the quick run also compiles the decoders (CUDA graphs) and picks the faster plain decoding;
    the benchmark itself raises if speculative decoding's tokens are not the target's greedy choices."""
    (path,) = run_speculative_benchmark(tmp_path, quick=True)
    saved = json.loads(path.read_text())
    compared = saved["plain_eager_vs_compiled"]  # both ways of plain decoding were timed
    assert saved["machinery"] == (GRAPHED if compared["speedup"] > 1 else "eager")
    for row in saved["draft_lengths"]:
        assert row["speculative_tokens_per_s"] > 0 and row["speedup"] > 0
