"""Per-rank memory of data-parallel training, whole or sharded: DDP, ZeRO-1, ZeRO-2, FSDP2 (ZeRO-3).

    predict_sharded_memory(config, batch=2, seq_len=32, world_size=4, scheme="zero2").peak   # bytes, rank
    launch(measure_sharded_step, 4, args=(config, 2, 32, "zero2"))                          # measured
    python -m common.memory.sharded                                                          # the table

What you will learn: which of a step's terms each scheme divides by the number of ranks p, what it pays
for that in buffers, and where in the step each one peaks. The activations are the week-5 predictor's
(common.memory.anatomy, at this rank's batch): no data-parallel scheme changes them. So are the phases of a
whole-model step; the formulas below say how each scheme changes them.

Notation (bytes): P = the model's parameters in param_dtype (N elements x B bytes); P_s = one rank's shard of
them: ZeRO pads each flattened parameter to a multiple of p, FSDP2 pads each parameter's first dimension,
both about P / p; k = the optimizer's state tensors per parameter (AdamW 2, SGD without momentum 0), t its
step's temporaries (the foreach AdamW's square roots: 1); S_5 = P + buffers + k P, week 5's static memory;
R = the parameters outside the blocks (embeddings, final norm, output layer: FSDP2's root unit); L_b = one
block's parameters; G = the largest parameter (ZeRO's collectives go one parameter at a time). Phases of
week 5 (forward in the loss, backward at the loss, in each block, optimizer.step) are written W5[phase].

| scheme | between steps | peak candidates (the largest wins) |
| --- | --- | --- |
| DDP | S_5 + P (gradient buckets) | every W5 phase + P: apply_ddp's flat buckets hold a copy of every gradient, always |
| ZeRO-1 | P + buffers + P_s (the optimizer's shard copy) + k P_s | W5 forward and backward phases - S_5 + static; step: static + P (gradients, whole) + P_s (shard gradients) + max(t P_s, G + G / p) (foreach temporary; one parameter's padded copy and its shard in the reduce-scatter) |
| ZeRO-2 | as ZeRO-1 | W5 forward and at-the-loss phases - S_5 + static; backward at the output layer (untied): the at-the-loss phase + the layer's gradient, its padded copy and its shard, O (2 + 1/p) with O = V d B; the largest gradient reduce-scattered after every other's (a tied embedding's is): static + P_s + G (2 + 1/p); step: static + P_s + max(t P_s, G) (the all-gather's buffer) |
| FSDP2 | P_s + buffers + k P_s | forward, gathering the last block: static + R + (activations of the blocks before it) + 3 L_b; forward, in the loss: static + R + activations + the logits + L_b; backward in the last block: static + R + (activations - head) + (V d + d) B (output and final-norm gradients) + 3 L_b + L_b / p; step: static + P_s + t P_s |

FSDP2 with reshard_after_forward=False keeps every block's gathered parameters from its forward to its
backward: the earlier blocks' (L - 1) L_b more while the last is gathered, L L_b more in the loss, and in
the backward L L_b in place of the 2 L_b of a block gathered again. The backward candidate counts the
block's activations and its gradients whole at once, though its backward frees the first while it makes
the second: an upper bound, a few percent over what is measured.
Why 3 L_b while a block is gathered: FSDP2 all-gathers a block into one flat buffer and copies its
parameters out of it, and keeps the previous block's buffer until the next all-gather has started (on a
GPU, so that a copy-out overlaps the next collective): the previous buffer, this one, and the copied-out
parameters. In the backward, the block's own gathered parameters and buffer, its gradients whole (L_b),
and the reduce-scatter's output, its shard (L_b / p).

What it leaves out: gloo's own buffers (not torch tensors), ZeRO-2's block-by-block backward (the
finished blocks' gradients are shards, so the at-the-loss and output-layer moments are its largest in
practice), and FSDP2's mixed precision (MixedPrecisionPolicy: gathered parameters in the compute dtype).
The test holds predictions to measurements within 15% on 2 and 4 gloo ranks; the measurements count live
tensor storage (common.memory.probe), since a CPU has no allocator statistics.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from common.bench import environment, save_results
from common.distributed.ddp import apply_ddp
from common.distributed.fsdp import apply_fsdp
from common.distributed.launch import launch, rank_device
from common.distributed.zero import ZeroOptimizer, shard_numel
from common.memory.anatomy import (
    OPTIMIZER_STATES,
    OPTIMIZER_TEMPORARIES,
    MeasuredStep,
    StepMemory,
    _peak_on_gpu,
    predict_step_memory,
)
from common.memory.probe import LiveTensorBytes
from common.models.llama import Llama, LlamaConfig, random_batch

__all__ = [
    "SCHEMES",
    "ShardedMemory",
    "measure_sharded_step",
    "memory_table",
    "predict_sharded_memory",
    "run_sharded_memory_benchmark",
]

SCHEMES = ("ddp", "zero1", "zero2", "fsdp2")
MEMORY_GOAL = 0.15  # the largest |predicted / measured - 1| the tests and week 6's README allow


@dataclass(frozen=True)
class ShardedMemory:
    """One rank's memory in bytes for one scheme; `peak` is reached during `peak_phase`."""

    scheme: str
    world_size: int
    parameters: int  # held between steps: whole (DDP, ZeRO) or this rank's shard (FSDP2)
    gradients: int  # at optimizer.step(): whole (DDP, ZeRO-1) or a shard (ZeRO-2, FSDP2)
    optimizer_states: int  # whole (DDP) or this rank's shard
    shard_copy: int  # ZeRO's copy of this rank's shard of the parameters, which its optimizer updates
    communication: int  # DDP's buckets (always there), else the largest collective buffer of the peak phase
    activations: int  # saved for backward, at this rank's batch (week 5's predictor)
    peak: int
    peak_phase: str


def _parameter_shapes(config: LlamaConfig) -> dict[str, torch.Size]:
    """Every parameter's shape, from a model built on the meta device (no memory, no compute)."""
    with torch.device("meta"):
        return {name: p.shape for name, p in Llama(config).named_parameters()}


def _fsdp_shard_numel(shape: torch.Size, world_size: int) -> int:
    """FSDP2's shard: dim 0 padded to a multiple of p, then cut in p (chunk sizes ceil(dim0 / p))."""
    rows = shape[0] if len(shape) else 1
    return shard_numel(rows, world_size) * (shape.numel() // max(rows, 1))


def predict_sharded_memory(
    config: LlamaConfig,
    batch: int,
    seq_len: int,
    world_size: int,
    scheme: str,
    *,
    reshard_after_forward: bool = True,
    param_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    optimizer: str = "adamw",
) -> ShardedMemory:
    """Predict one rank's memory for a training step of Llama(config) under `scheme` (module docstring).

    batch: sequences on this rank (its slice of the global batch). world_size: ranks the model is sharded
    over. reshard_after_forward: FSDP2's option (ignored by the others). param_dtype: parameters,
    gradients and optimizer states; compute_dtype: the autocast dtype, or None. optimizer: "adamw" or "sgd"
    (foreach, as week 5 models them).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}: choose one of {', '.join(SCHEMES)}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    step = predict_step_memory(
        config, batch, seq_len, param_dtype=param_dtype, compute_dtype=compute_dtype, optimizer=optimizer
    )
    shapes = _parameter_shapes(config)
    if scheme == "ddp":
        return _ddp(step, world_size)
    if scheme in ("zero1", "zero2"):
        return _zero(config, step, shapes, world_size, int(scheme[-1]), param_dtype.itemsize, optimizer)
    return _fsdp2(
        config,
        step,
        shapes,
        world_size,
        reshard_after_forward,
        param_dtype.itemsize,
        optimizer,
        batch * seq_len,
    )


def _ddp(step: StepMemory, world_size: int) -> ShardedMemory:
    """Every phase of the whole-model step, plus the buckets: apply_ddp keeps a copy of every gradient."""
    buckets = step.parameters
    phase, peak = max(((n, v + buckets) for n, v in step.phases), key=lambda item: item[1])
    return ShardedMemory(
        "ddp",
        world_size,
        step.parameters,
        step.gradients,
        step.optimizer_states,
        0,
        buckets,
        step.activations,
        peak,
        phase,
    )


def _zero(
    config: LlamaConfig,
    step: StepMemory,
    shapes: dict[str, torch.Size],
    world_size: int,
    stage: int,
    b: int,
    optimizer: str,
) -> ShardedMemory:
    """ZeRO-1 and ZeRO-2: week 5's forward and backward with the static memory changed, and their own step."""
    k, t = OPTIMIZER_STATES[optimizer], OPTIMIZER_TEMPORARIES[optimizer]
    whole = step.parameters
    shard = sum(shard_numel(s.numel(), world_size) for s in shapes.values()) * b
    padded_largest = shard_numel(max(s.numel() for s in shapes.values()), world_size) * world_size * b
    static = whole + step.buffers + shard + k * shard
    shift = static - (step.parameters + step.buffers + step.optimizer_states)
    forward_and_loss = [(n, v) for n, v in step.phases if n.startswith(("forward", "backward, at the loss"))]
    if stage == 1:
        communication = padded_largest + padded_largest // world_size
        blocks = [(n, v) for n, v in step.phases if n.startswith("backward, in block")]
        phases = [(n, v + shift) for n, v in forward_and_loss + blocks]
        phases.append(
            (
                "optimizer.step() (gradients whole, their shards, the step's temporary)",
                static + whole + shard + max(t * shard, communication),
            )
        )
        gradients = whole
    else:
        communication = 2 * padded_largest + padded_largest // world_size
        at_loss = next(v for n, v in forward_and_loss if n.startswith("backward, at the loss"))
        phases = [(n, v + shift) for n, v in forward_and_loss]
        if not config.tie_embeddings:  # (tied, its gradient is complete only after the embedding's)
            output = shard_numel(config.vocab_size * config.d_model, world_size) * world_size * b
            phases.append(
                (
                    "backward, reduce-scattering the output layer's gradient",
                    at_loss + shift + 2 * output + output // world_size,
                )
            )
        phases.append(
            (
                "backward, reduce-scattering the largest gradient, after every other's",
                static + shard + communication,
            )
        )
        phases.append(
            (
                "optimizer.step() (gradient shards, the step's temporary)",
                static + shard + max(t * shard, padded_largest),
            )
        )
        gradients = shard
    phase, peak = max(phases, key=lambda item: item[1])
    return ShardedMemory(
        f"zero{stage}",
        world_size,
        whole,
        gradients,
        k * shard,
        shard,
        communication,
        step.activations,
        peak,
        phase,
    )


def _fsdp2(
    config: LlamaConfig,
    step: StepMemory,
    shapes: dict[str, torch.Size],
    world_size: int,
    reshard_after_forward: bool,
    b: int,
    optimizer: str,
    tokens: int,
) -> ShardedMemory:
    """FSDP2: one unit per block and the root (embeddings, final norm, output layer); its own phases."""
    k, t = OPTIMIZER_STATES[optimizer], OPTIMIZER_TEMPORARIES[optimizer]
    shard = sum(_fsdp_shard_numel(s, world_size) for s in shapes.values()) * b
    block = sum(s.numel() for n, s in shapes.items() if n.startswith("layers.0.")) * b
    root = sum(s.numel() for n, s in shapes.items() if not n.startswith("layers.")) * b
    static = shard + step.buffers + k * shard
    kept = 0 if reshard_after_forward else config.n_layers * block  # gathered blocks kept for the backward
    logits = tokens * config.vocab_size * 4
    before_last = step.activations - step.activations_per_layer - step.head_activations
    output_grads = (config.vocab_size * config.d_model + config.d_model) * b
    phases = [
        (
            "forward, gathering the last block (3 block-sized buffers)",
            static + root + before_last + 3 * block + kept - (0 if reshard_after_forward else block),
        ),
        ("forward, in the loss", static + root + step.activations + logits + block + kept),
        (
            "backward, in the last block (gathered, its gradients whole and their shard)",
            static
            + root
            + step.activations
            - step.head_activations
            + output_grads
            + (2 * block if reshard_after_forward else kept)
            + block
            + block // world_size,
        ),
        ("optimizer.step() (gradient shards, the step's temporary)", static + shard + t * shard),
    ]
    phase, peak = max(phases, key=lambda item: item[1])
    return ShardedMemory(
        "fsdp2", world_size, shard, shard, k * shard, 0, 3 * block + kept, step.activations, peak, phase
    )


def measure_sharded_step(
    config: LlamaConfig,
    batch: int,
    seq_len: int,
    scheme: str,
    *,
    reshard_after_forward: bool | int = True,
    optimizer: str = "adamw",
) -> MeasuredStep:
    """Measure one steady-state training step on this rank (call on every rank, inside launch).

    The model is built from seed 0 and made data parallel by `scheme` (apply_ddp, ZeroOptimizer stage 1
    or 2, apply_fsdp); the optimizer is foreach AdamW or SGD with learning rate 1e-6 (the step must run, not
    train); each rank gets its own random batch. reshard_after_forward goes to apply_fsdp (an int too,
    which predict_sharded_memory does not model). A first step creates the optimizer's states; the second
    is measured with LiveTensorBytes, from gradients set to None, as predicted.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"scheme={scheme!r}: choose one of {', '.join(SCHEMES)}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(
            f"optimizer={optimizer!r} is not modelled; choose one of {', '.join(OPTIMIZER_STATES)}"
        )
    device = rank_device()
    torch.manual_seed(0)
    model = Llama(config).to(device)
    options = {"lr": 1e-6, "weight_decay": 0.0, "foreach": True}
    optimizer_class = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    if optimizer == "sgd":
        del options["weight_decay"]
    hooks = apply_ddp(model) if scheme == "ddp" else None
    if scheme == "fsdp2":
        apply_fsdp(model, reshard_after_forward=reshard_after_forward)
    if scheme in ("zero1", "zero2"):
        opt = hooks = ZeroOptimizer(model.parameters(), optimizer_class, stage=int(scheme[-1]), **options)
    else:
        opt = optimizer_class(model.parameters(), **options)
    tokens, targets = random_batch(config, batch, seq_len, seed=dist.get_rank(), device=device)

    def step() -> None:
        model.loss(tokens, targets).backward()
        opt.step()
        opt.zero_grad()

    step()
    try:
        if device.type == "cuda":
            return _peak_on_gpu(step, device)
        with LiveTensorBytes() as probe:
            step()
        return MeasuredStep(before=probe.before, peak=probe.peak)
    finally:
        if hooks is not None:  # gradient hooks hold the model through C++, where gc cannot see: unhook it
            hooks.remove()


# What the week-6 README quotes: a model that runs a step in well under a second on a CPU, large enough that
# the terms that differ between the schemes (parameters, gradients, states) dominate the activations.
TABLE_CONFIG = LlamaConfig(
    vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=64
)
TABLE_BATCH, TABLE_SEQ = 2, 32
TABLE_RUNS = (("ddp", True), ("zero1", True), ("zero2", True), ("fsdp2", True), ("fsdp2", False))


def _measure_all(config: LlamaConfig, batch: int, seq_len: int) -> dict[str, MeasuredStep]:
    """Every scheme of TABLE_RUNS on this rank: one launch measures them all."""
    return {
        _run_name(scheme, reshard): measure_sharded_step(
            config, batch, seq_len, scheme, reshard_after_forward=reshard
        )
        for scheme, reshard in TABLE_RUNS
    }


def _run_name(scheme: str, reshard: bool) -> str:
    return scheme if scheme != "fsdp2" or reshard else "fsdp2 (keep gathered)"


@dataclass(frozen=True)
class TableRow:
    """One scheme at one world size: predicted and measured peak of the most loaded rank."""

    scheme: str
    world_size: int
    predicted: ShardedMemory
    measured_peak: int  # the largest over the ranks

    @property
    def error(self) -> float:
        return self.predicted.peak / self.measured_peak - 1


def measure_every_scheme(
    world_size: int, config: LlamaConfig = TABLE_CONFIG, batch: int = TABLE_BATCH, seq_len: int = TABLE_SEQ
) -> dict[int, dict[str, MeasuredStep]]:
    """Every scheme of TABLE_RUNS measured on `world_size` gloo ranks: {rank: {run name: MeasuredStep}}.

    The ranks are fresh interpreters (start_method="spawn"): LiveTensorBytes counts every tensor alive in its
    process, and a rank forked from a notebook or a test session would count that process's tensors too."""
    return launch(
        _measure_all,
        world_size,
        args=(config, batch, seq_len),
        backend="gloo",
        timeout_s=600,
        start_method="spawn",
    )


def memory_table(
    config: LlamaConfig = TABLE_CONFIG,
    batch: int = TABLE_BATCH,
    seq_len: int = TABLE_SEQ,
    world_sizes: tuple[int, ...] = (2, 4),
) -> list[TableRow]:
    """Predicted against measured per-rank peaks, every scheme, on gloo ranks (one launch per world size)."""
    rows = []
    for world in world_sizes:
        measured = measure_every_scheme(world, config, batch, seq_len)
        for scheme, reshard in TABLE_RUNS:
            name = _run_name(scheme, reshard)
            predicted = predict_sharded_memory(
                config, batch, seq_len, world, scheme, reshard_after_forward=reshard
            )
            peak = max(by_rank[name].peak for by_rank in measured.values())
            rows.append(TableRow(name, world, predicted, peak))
    return rows


def row_record(row: TableRow) -> dict[str, Any]:
    """One row as JSON data: the predicted terms and peak, the measured peak of the most loaded rank, bytes."""
    p = row.predicted
    return {"scheme": row.scheme, "world_size": row.world_size, "parameters": p.parameters,
            "gradients": p.gradients, "optimizer_states": p.optimizer_states, "predicted_peak": p.peak,
            "measured_peak": row.measured_peak, "error": row.error, "peak_phase": p.peak_phase}  # fmt: skip


def format_table(records: list[dict[str, Any]]) -> str:
    """Rows (as `row_record` writes them) as a markdown table, MiB (2^20 bytes)."""
    mib = 2**20
    lines = [
        "| scheme | ranks | parameters | gradients | optimizer states | predicted peak | measured peak | error | "
        "peak phase (predicted) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in records:
        lines.append(
            f"| {r['scheme']} | {r['world_size']} | {r['parameters'] / mib:.2f} | {r['gradients'] / mib:.2f} | "
            f"{r['optimizer_states'] / mib:.2f} | {r['predicted_peak'] / mib:.2f} | "
            f"{r['measured_peak'] / mib:.2f} | {r['error']:+.1%} | {r['peak_phase']} |"
        )
    return "\n".join(lines)


def table_heading() -> str:
    """The line above the table: the model and the batch it was measured with."""
    c = TABLE_CONFIG
    return (
        f"Llama(vocab {c.vocab_size}, d_model {c.d_model}, {c.n_layers} layers, d_ff {c.d_ff}), "
        f"{TABLE_BATCH} x {TABLE_SEQ} tokens per rank, fp32, foreach AdamW; MiB per rank"
    )


def print_table(rows: list[dict[str, Any]]) -> None:
    """The table as run_sharded_memory_benchmark and `python -m common.memory.sharded` print it."""
    print(table_heading())
    print(format_table(rows))


def run_sharded_memory_benchmark(out_dir: Path, world_sizes: tuple[int, ...] = (2, 4)) -> list[Path]:
    """memory_table on gloo ranks, saved as JSON (the table week06_fsdp/README.md quotes) with the largest
    error against MEMORY_GOAL, the run's wall time and the machine's load; prints the table."""
    load_before, start = os.getloadavg()[0], time.perf_counter()
    rows = [row_record(row) for row in memory_table(world_sizes=world_sizes)]
    worst = max(abs(r["error"]) for r in rows)
    record = {
        "benchmark": "sharded_memory",
        "description": "per-rank peak memory of one training step, DDP, ZeRO-1, ZeRO-2 and FSDP2: predicted by "
        "common.memory.sharded, measured (live tensor storage, the most loaded rank) on gloo CPU ranks",
        "heading": table_heading(),
        "config": {
            **asdict(TABLE_CONFIG),
            "batch_per_rank": TABLE_BATCH,
            "seq_len": TABLE_SEQ,
            "world_sizes": list(world_sizes),
        },  # fmt: skip
        "rows": rows,
        "goal": {
            "metric": "largest |predicted / measured - 1|",
            "op": "<=",
            "value": MEMORY_GOAL,
            "met": worst <= MEMORY_GOAL,
        },  # fmt: skip
        "largest_error": worst,
        "wall_s": time.perf_counter() - start,
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "environment": environment("cpu"),
    }
    path = save_results(record, Path(out_dir) / "memory_sharded.json")
    print_table(rows)
    print(
        f"largest error {worst:.1%}; goal <= {MEMORY_GOAL:.0%}: {'met' if record['goal']['met'] else 'missed'}"
    )
    return [path]


def main() -> None:
    """Print the predicted and measured per-rank peaks of every scheme on 2 and 4 gloo ranks."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args()
    print_table([row_record(row) for row in memory_table(world_sizes=tuple(args.world_sizes))])


if __name__ == "__main__":
    main()
