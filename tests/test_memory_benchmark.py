"""`effdl bench large-models --quick` on the CPU: every part runs, saves its JSON and judges its goal."""

import json
from pathlib import Path

import pytest
import torch

from common.hardware import NoGPUError
from common.memory import benchmark


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    if torch.cuda.is_available():
        pytest.skip("checks the CPU path; on a GPU `effdl bench large-models` runs the real sizes")
    out = tmp_path_factory.mktemp("large_models")
    paths = benchmark.run_large_model_benchmarks(out, quick=True)
    return {json.loads(Path(p).read_text())["benchmark"]: json.loads(Path(p).read_text()) for p in paths}


def test_every_part_is_saved_with_its_environment(saved: dict[str, dict]) -> None:
    assert set(saved) == {"memory", "checkpointing", "offload", "kernels"}
    for record in saved.values():
        assert record["quick"] is True
        assert record["environment"]["device"] == "cpu"


def test_memory_rows_compare_prediction_and_measurement(saved: dict[str, dict]) -> None:
    rows = saved["memory"]["rows"]
    assert [row["model"] for row in rows] == ["toy", "toy-4-layers"]
    for row in rows:
        assert row["error"] == pytest.approx(row["measured_peak_bytes"] / row["predicted_peak_bytes"] - 1)
        # On a CPU the profiler sees every tensor and the predictor is exact for the toy (test_memory_anatomy).
        assert abs(row["error"]) <= benchmark.GOALS["memory"]
    assert rows[1]["measured_peak_bytes"] > rows[0]["measured_peak_bytes"], "more layers, more memory"
    assert saved["memory"]["met"] is True


def test_checkpointing_and_offload_report_their_ratios_and_goals(saved: dict[str, dict]) -> None:
    ckpt = saved["checkpointing"]
    saved_bytes = {mode: m["saved_activation_bytes"] for mode, m in ckpt["modes"].items()}
    assert saved_bytes["full"] < saved_bytes["selective"] < saved_bytes["none"]
    step = {mode: m["step_ms"] for mode, m in ckpt["modes"].items()}
    assert ckpt["extra_time"]["full"] == pytest.approx(step["full"] / step["none"] - 1)
    assert ckpt["met"] == all(ckpt["extra_time"][m] <= ckpt["goal"][m] for m in ("full", "selective"))
    offload = saved["offload"]
    assert set(offload["variants"]) == {"none", "offload", "offload+prefetch"}
    kept = offload["throughput_kept"]["offload+prefetch"]
    tokens = offload["variants"]
    assert kept == pytest.approx(tokens["offload+prefetch"]["tokens_per_s"] / tokens["none"]["tokens_per_s"])
    assert offload["met"] == (kept >= benchmark.GOALS["offload"])


def test_kernels_are_skipped_on_a_cpu_and_the_full_run_needs_a_gpu(saved: dict[str, dict]) -> None:
    assert "CUDA" in saved["kernels"]["skipped"]
    with pytest.raises(NoGPUError, match="--quick"):
        benchmark.run_large_model_benchmarks(Path("unused"), quick=False)
