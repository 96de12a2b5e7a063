"""common.memory.sharded and common.memory.probe: per-rank memory of DDP, ZeRO-1/2 and FSDP2, predicted and measured.

The probe is held to an independent count first: on one process, where the profiler sees every allocation,
its peak must equal week 5's measure_step_memory (the profiler's memory timeline). Then every scheme's
predicted per-rank peak must be within 15% of the probe's on 2 and 4 gloo ranks (one launch per world size
measures every scheme), and the terms that are exact by construction are checked exactly.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch

from common.distributed.launch import launch
from common.distributed.zero import shard_numel
from common.memory.anatomy import measure_step_memory
from common.memory.probe import LiveTensorBytes
from common.memory.sharded import (
    MEMORY_GOAL,
    TABLE_BATCH,
    TABLE_CONFIG,
    TABLE_RUNS,
    TABLE_SEQ,
    MeasuredStep,
    _run_name,
    format_table,
    measure_every_scheme,
    predict_sharded_memory,
    table_heading,
)
from common.models.llama import Llama, LlamaConfig, count_parameters, random_batch
from common.weeks import REPO_ROOT

WORLD_SIZES = (2, 4)


def probe_and_profiler() -> tuple[MeasuredStep, MeasuredStep, int]:
    """One step measured by both, and AdamW's step counters' bytes (run in a fresh process: see below)."""
    config = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, d_ff=176, max_seq_len=64)
    torch.manual_seed(0)
    profiled = measure_step_memory(Llama(config), 4, 32)
    torch.manual_seed(0)
    model = Llama(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, foreach=True)
    tokens, targets = random_batch(config, 4, 32)

    def step() -> None:
        model.loss(tokens, targets).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    with LiveTensorBytes() as probe:
        step()
    counters = 4 * len(list(model.parameters()))  # AdamW's fp32 step counters
    return MeasuredStep(probe.before, probe.peak), MeasuredStep(profiled.before, profiled.peak), counters


def test_probe_equals_the_profilers_count_on_one_process() -> None:
    """Both count whole storages of torch's CPU tensors, so on one process they must agree to the byte,
    apart from AdamW's step counters (0-dim, created by the warm-up step in either case). The process is a
    fresh one: the probe counts every tensor alive in its process, and this test session holds others'."""
    probe, profiled, counters = launch(probe_and_profiler, 1, start_method="spawn")[0]
    assert abs(probe.before - profiled.before) <= counters, (probe.before, profiled.before)
    assert abs(probe.peak - profiled.peak) <= counters, (probe.peak, profiled.peak)
    assert probe.peak > probe.before


def test_probe_counts_an_in_place_resize_and_a_free() -> None:
    """FSDP2 frees and re-allocates gathered parameters by resizing their storage: the probe follows."""
    with LiveTensorBytes() as probe:
        x = torch.empty(1000)  # 4000 bytes
        x.untyped_storage().resize_(0)
        x.untyped_storage().resize_(8000)
        del x
        y = torch.empty(10)
    assert probe.peak - probe.before == 8000
    assert probe.live - probe.before == 40
    del y


@pytest.mark.parametrize("world", WORLD_SIZES)
def test_sharded_terms_are_the_shards_sizes(world: int) -> None:
    """Exact terms: ZeRO's states are ceil(n / p) per parameter; FSDP2's parameters pad dim 0; DDP is whole."""
    config, b = TABLE_CONFIG, 4
    n = count_parameters(config)
    with torch.device("meta"):
        shapes = [p.shape for p in Llama(config).parameters()]
    zero_shard = sum(shard_numel(s.numel(), world) for s in shapes) * b
    fsdp_shard = sum(shard_numel(s[0], world) * s.numel() // s[0] for s in shapes) * b
    ddp = predict_sharded_memory(config, 2, 32, world, "ddp")
    assert (ddp.parameters, ddp.gradients, ddp.optimizer_states) == (n * b, n * b, 2 * n * b)
    for stage, gradients in (("zero1", n * b), ("zero2", zero_shard)):
        zero = predict_sharded_memory(config, 2, 32, world, stage)
        assert (zero.parameters, zero.gradients, zero.optimizer_states) == (n * b, gradients, 2 * zero_shard)
    fsdp = predict_sharded_memory(config, 2, 32, world, "fsdp2")
    assert (fsdp.parameters, fsdp.gradients, fsdp.optimizer_states) == (
        fsdp_shard,
        fsdp_shard,
        2 * fsdp_shard,
    )
    sgd = predict_sharded_memory(config, 2, 32, world, "zero1", optimizer="sgd")
    assert sgd.optimizer_states == 0


def test_more_ranks_need_less_memory_and_more_sharding_less_still() -> None:
    config = LlamaConfig.preset("1b")
    peaks = {
        (scheme, world): predict_sharded_memory(
            config, 1, 1024, world, scheme, compute_dtype=torch.bfloat16
        ).peak
        for scheme in ("ddp", "zero1", "zero2", "fsdp2")
        for world in (2, 8, 64)
    }
    for world in (2, 8, 64):
        assert peaks["ddp", world] > peaks["zero1", world] >= peaks["zero2", world]
        assert peaks["zero2", world] > peaks["fsdp2", world]
    assert peaks["zero1", 8] > peaks["zero2", 8]  # the whole gradients at the step, ZeRO-1's peak there
    for scheme in ("zero1", "zero2", "fsdp2"):
        assert peaks[scheme, 2] > peaks[scheme, 8] > peaks[scheme, 64]
    assert peaks["ddp", 2] == peaks["ddp", 64]


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="scheme='zero3': choose one of ddp, zero1, zero2, fsdp2"):
        predict_sharded_memory(TABLE_CONFIG, 2, 32, 2, "zero3")
    with pytest.raises(ValueError, match="world_size must be >= 1, got 0"):
        predict_sharded_memory(TABLE_CONFIG, 2, 32, 0, "ddp")


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda w: f"{w}ranks")
def measured(request) -> tuple[int, dict]:
    """Every scheme measured on every rank: one launch per world size."""
    return request.param, measure_every_scheme(request.param)


# 15%: what the predictions leave out or bound from above is a few percent here (FSDP2's backward counts a
# block's activations and gradients at once; ZeRO-2's reduce-scatter a whole padded copy), while a term
# missed or not divided by p is 10% to 50% of a peak at this size (the gradients alone are 3.3 MiB of 10 to 20).
TOLERANCE = MEMORY_GOAL


@pytest.mark.distributed
@pytest.mark.parametrize("run", TABLE_RUNS, ids=lambda run: _run_name(*run))
def test_predicted_peak_is_within_15_percent_of_each_ranks_measured(measured, run) -> None:
    world, by_rank = measured
    scheme, reshard = run
    predicted = predict_sharded_memory(
        TABLE_CONFIG, TABLE_BATCH, TABLE_SEQ, world, scheme, reshard_after_forward=reshard
    )
    for rank, report in by_rank.items():
        got = report[_run_name(scheme, reshard)]
        assert got.peak == pytest.approx(predicted.peak, rel=TOLERANCE), (rank, got, predicted)


RESULT = REPO_ROOT / "benchmarks" / "results" / "cpu-amd-epyc-2-cores" / "memory_sharded.json"


def test_week06_readme_quotes_the_committed_memory_benchmark() -> None:
    """The README's table is the committed JSON's (effdl bench sharded-memory), whose predictions are what the
    predictor gives for its model today; the sentences that read it quote its numbers, and its claim, every
    prediction within 15%, holds there."""
    record = json.loads(RESULT.read_text())
    readme = (REPO_ROOT / "week06_fsdp" / "README.md").read_text()
    assert record["config"] == {**asdict(TABLE_CONFIG), "batch_per_rank": TABLE_BATCH, "seq_len": TABLE_SEQ,
                                "world_sizes": [2, 4]}  # fmt: skip
    rows = {(r["scheme"], r["world_size"]): r for r in record["rows"]}
    assert sorted(rows) == sorted((_run_name(s, k), w) for w in (2, 4) for s, k in TABLE_RUNS)
    for (name, world), row in rows.items():
        scheme, reshard = next((s, k) for s, k in TABLE_RUNS if _run_name(s, k) == name)
        predicted = predict_sharded_memory(
            TABLE_CONFIG, TABLE_BATCH, TABLE_SEQ, world, scheme, reshard_after_forward=reshard
        )
        assert (row["predicted_peak"], row["parameters"], row["peak_phase"]) == (
            predicted.peak,
            predicted.parameters,
            predicted.peak_phase,
        ), (name, world)
        assert row["error"] == pytest.approx(row["predicted_peak"] / row["measured_peak"] - 1)
    assert f"{table_heading()}\n{format_table(record['rows'])}\n```" in readme
    worst = max(abs(r["error"]) for r in record["rows"])
    assert worst == record["largest_error"] <= MEMORY_GOAL == 0.15 and record["goal"]["met"]
    assert "Every prediction is within 15% of the measurement" in readme
    assert f"(the largest miss is {worst:.1%})" in readme

    def kept_minus_resharded(key: str, world: int) -> float:
        return (rows["fsdp2 (keep gathered)", world][key] - rows["fsdp2", world][key]) / 2**20

    predicted = {f"{kept_minus_resharded('predicted_peak', w):.1f}" for w in (2, 4)}
    assert len(predicted) == 1, predicted  # the README states one predicted difference for both
    assert (
        f"predicted {predicted.pop()} MiB more per rank here, measured "
        f"{kept_minus_resharded('measured_peak', 2):.1f} MiB on 2 ranks and "
        f"{kept_minus_resharded('measured_peak', 4):.1f} MiB on 4."
    ) in " ".join(readme.split())
