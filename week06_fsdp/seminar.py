# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     notebook_metadata_filter: -jupytext.text_representation
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Week 6 seminar: sharded data parallelism, from ZeRO to FSDP2
#
# Data parallelism (week 4) keeps the whole model, its whole gradient and the whole optimizer state on every
# rank. This seminar takes the lecture's path from there to FSDP2, PyTorch's `fully_shard`, and checks every
# step of it on real ranks:
#
# 1. **DeviceMesh and DTensor**: a tensor sharded over ranks, and the collective behind each change of
#    placement, against the same computation in one process.
# 2. **ZeRO-1, ZeRO-2, FSDP2 and its variants train like one process**, and what each rank holds: FSDP2's
#    parameters are DTensors, 1/p of the model on each rank.
# 3. **Memory per rank**, predicted term by term by `common.memory.sharded` and measured.
# 4. **FSDP2's knobs**, each with what it sends and what it keeps: `reshard_after_forward` (True, False, an
#    int), `MixedPrecisionPolicy`, explicit prefetching, `CPUOffloadPolicy`.
# 5. **HSDP** on a 2-D mesh, and how torchtitan composes FSDP with tensor and pipeline parallelism.
# 6. **Distributed checkpoints** (`torch.distributed.checkpoint`): saved on N ranks, loaded on N/2, and the
#    training goes on as if nothing had happened.
# 7. **On the GPU**: a profiler trace, a memory snapshot, MFU with the week-5 FLOP counter, and what CPU
#    offload saves.
#
# The ranks are CPU processes that talk through gloo, started by `common.distributed.launch`: 2 at small size
# (CI, a laptop), 4 at full size. What they run lives in `fsdp_runs.py` beside this notebook. Sections 1 and 2
# fork their ranks from the notebook (milliseconds) where there is no GPU (on a GPU machine, asking torch
# whether there is one started CUDA's driver here, which a forked rank cannot use: `launch` says more);
# from section 3 on, ranks are spawned, fresh interpreters
# that import what they run (seconds each): the memory probe of section 3 counts every tensor of its process,
# so it needs a fresh one, and once this notebook has run a backward pass (section 2's reference), a rank
# forked from it on a GPU machine could not run autograd (week 5 says why; `launch` says so if it happens,
# say when section 2 is run again after section 3). Section 7 runs only where `DEVICE == "cuda"`.
#
# Cells that state a fact check it with `assert`. Memory here is counted in bytes of live tensors, and
# collectives are counted call by call: both are the same on every run, so the asserts hold them exactly or
# within a stated tolerance. Nothing below relies on a CPU timing.

# %% tags=["parameters"]
import os

import torch

# SMALL: 2 ranks (a laptop, CI); full: 4 ranks, and on a GPU the 350M model in section 7.
# `effdl seminar --small/--full` and CI set EFFDL_SMALL; the default is full on a GPU machine, small on a CPU.
SMALL = os.environ.get("EFFDL_SMALL", "0" if torch.cuda.is_available() else "1") == "1"
# Where section 7 measures. The sharded schemes run on gloo CPU ranks on every machine.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# %%
import inspect
import shutil
from collections import Counter

import matplotlib.pyplot as plt
import numpy as np
import torch.distributed.checkpoint as dcp
from fsdp_runs import (  # beside this notebook: what the ranks run
    ADAMW,
    COLS,
    CONFIG,
    MORE_STEPS,
    PREFETCH,
    ROWS,
    STEPS,
    batches,
    dtensor_tour,
    fresh_model,
    fsdp_prefetching,
    gpu_tour,
    measure_reshard_to,
    resume,
    schemes,
    summand,
    train_every_scheme,
)

from common.distributed.cost_model import bus_bandwidth_factor
from common.distributed.fsdp import train_steps
from common.distributed.launch import launch
from common.environment import environment
from common.memory.sharded import (
    TABLE_BATCH,
    TABLE_CONFIG,
    TABLE_RUNS,
    TABLE_SEQ,
    measure_every_scheme,
    predict_sharded_memory,
)
from common.models.llama import LlamaConfig, count_parameters
from common.tables import show_table
from common.weeks import REPO_ROOT

BACKEND = "gloo"
NPROCS = 2 if SMALL else 4  # ranks of every launch below
MiB = 2**20
RESULTS: dict[str, str] = {}  # one line per key result; the summary cell at the end prints them
# Checkpoints, traces and snapshots go to build/ (ignored by git), printed relative to the repository.
WORK = REPO_ROOT / "build" / "week06_fsdp"
WORK.mkdir(parents=True, exist_ok=True)
machine = environment("cpu")  # not the GPU's: asking CUDA about it here would initialize CUDA
print(
    f"sizes: {'small' if SMALL else 'full'}; {NPROCS} ranks on {BACKEND}; CPU: {machine['cpu']}, "
    f"{os.cpu_count()} cores; section 7 {'on the GPU' if DEVICE == 'cuda' else 'skipped (no GPU)'}; "
    f"torch {torch.__version__}"
)


def on_ranks(fn, nprocs: int = NPROCS, args: tuple = (), *, fresh: bool = True) -> dict:
    """Run fn from fsdp_runs.py on gloo ranks, spawned (fresh, or on a GPU machine) or forked from this notebook:
    {rank: result}."""
    method = "spawn" if fresh or DEVICE == "cuda" else "fork"
    return launch(fn, nprocs, args=args, backend=BACKEND, timeout_s=900, start_method=method)


# %% [markdown]
# ## 1. DeviceMesh and DTensor
#
# A **DeviceMesh** arranges the ranks in named dimensions; here one dimension of `NPROCS` ranks. A
# **DTensor** is a global tensor together with a placement on each mesh dimension: `Shard(d)` (each rank
# holds one chunk along dim d, `torch.chunk`'s split, so the last ranks may hold fewer rows), `Replicate()`
# (each holds the whole), `Partial()` (each holds a summand; the value is their sum). Changing a placement
# is a collective, and DTensor picks it:
#
# | from | to | collective |
# | --- | --- | --- |
# | `Shard(0)` | `Replicate()` | all-gather |
# | `Partial()` | `Shard(0)` | reduce-scatter |
# | `Partial()` | `Replicate()` | all-reduce |
#
# FSDP2 is built on exactly these: its parameters are `Shard(0)` DTensors, all-gathered before a block
# runs; each rank's gradient is a summand, reduce-scattered back into `Shard(0)`. The cell below does each
# conversion on every rank (a 10 x 4 weight; x @ weight with the weight's rows sharded, which leaves a
# `Partial()` result, since each rank sums over its rows only) and counts what DTensor sent with
# `CommDebugMode`. Every local result is compared with the same computation on whole tensors in this
# process.

# %%
tour = on_ranks(dtensor_tour, fresh=False)  # before this notebook's first backward
weight = torch.arange(ROWS * COLS, dtype=torch.float32).reshape(ROWS, COLS)
x = torch.linspace(-1, 1, 3 * ROWS).reshape(3, ROWS)
total = sum(summand(r) for r in range(NPROCS))  # what the Partial() tensor stands for
expected = {  # rank -> step -> this rank's local tensor, computed on whole tensors
    rank: {
        "distribute_tensor(weight, [Shard(0)])": weight.chunk(NPROCS)[rank],
        "Shard(0) -> Replicate()": weight,
        "Replicate() @ Shard(0)": x[:, rows] @ weight[rows],  # this rank's rows: a summand of x @ weight
        "(Replicate() @ Shard(0)).full_tensor()": x @ weight,
        "Partial() -> Shard(0)": total.chunk(NPROCS)[rank],
        "Partial() -> Replicate()": total,
    }
    for rank, rows in enumerate(torch.arange(ROWS).chunk(NPROCS))
}
last = NPROCS - 1
show_table(
    ["step", "placement after", "rank 0's local shape", f"rank {last}'s", "collectives (each rank)"],
    [
        (step, ", ".join(r["placements"]) or "(a plain tensor)", tuple(r["local"].shape),
         tuple(tour[last][step]["local"].shape), ", ".join(f"{k} x{n}" for k, n in r["collectives"].items()))
        for step, r in tour[0].items()
    ],
)  # fmt: skip
for rank, steps in tour.items():
    for step, r in steps.items():
        # fp32 sums of 10 products in another order (a rank's rows, then the ranks): a few ulps apart
        torch.testing.assert_close(r["local"], expected[rank][step], rtol=1e-6, atol=1e-6, msg=step)
collectives = {step: r["collectives"] for step, r in tour[0].items()}
assert collectives["distribute_tensor(weight, [Shard(0)])"] == {"scatter_": 1}, "rank 0's chunks, sent"
assert collectives["Shard(0) -> Replicate()"] == {"all_gather_into_tensor": 1}
assert collectives["Replicate() @ Shard(0)"] == {}, "the matmul itself sends nothing: its result is Partial"
assert collectives["(Replicate() @ Shard(0)).full_tensor()"] == {"all_reduce": 1}
assert collectives["Partial() -> Shard(0)"] == {"reduce_scatter_tensor": 1}
assert collectives["Partial() -> Replicate()"] == {"all_reduce": 1}
assert tour[0]["Replicate() @ Shard(0)"]["placements"] == ["P(sum)"]
RESULTS["DTensor"] = (
    f"{NPROCS} ranks: Shard->Replicate all-gathers, Partial->Shard reduce-scatters, Partial->Replicate "
    "all-reduces; every local result equals one process's"
)

# %% [markdown]
# `distribute_tensor` itself sends the chunks from rank 0 (a scatter, so that every rank has the same
# values even if their copies differed). The matmul sends nothing: with the weight's rows sharded, DTensor
# shards x by columns to match (each rank slices its own copy) and returns a `Partial()` result, each rank's
# summand over its rows; only asking for the whole (`full_tensor()`) costs the all-reduce. That is the lazy
# evaluation of placements that week 5's tensor parallelism used, and that FSDP2 uses for its gradients.
#
# ## 2. ZeRO-1, ZeRO-2 and FSDP2 train like one process
#
# Every scheme below trains the same Llama (`CONFIG` in `fsdp_runs.py`: 4 layers, `d_model` 30 and a
# vocabulary of 61, so that the norms and embeddings do not divide by 4 ranks and the shards are padded) for
# `STEPS` AdamW steps on the same global batches, each rank on its 1/p slice of every batch, with
# `common.distributed.fsdp.train_steps`, the loop the week's tests use. The reference is one process on the
# whole batches. The schemes:
#
# - **ZeRO-1, ZeRO-2**: `common.distributed.zero.ZeroOptimizer`, the lecture's from-scratch version: the
#   optimizer's states (and in stage 2 the gradients) sharded, the parameters whole.
# - **FSDP2**: `apply_fsdp`, which calls `fully_shard` on each block and then on the root (embeddings, final
#   norm, output layer), and the same with each of the knobs of section 4, and HSDP (section 5).
#
# The check: every scheme's loss at every step and every parameter after the last step equal the reference's,
# within the tolerance written in the cell; bf16 gathering is checked against a tolerance of its own.

# %%
print(inspect.getsource(schemes))
CHECKPOINT = WORK / "checkpoint"
shutil.rmtree(CHECKPOINT, ignore_errors=True)  # a checkpoint of another world size would leave its files
trained = on_ranks(train_every_scheme, args=(str(CHECKPOINT),), fresh=False)  # ditto
threads = torch.get_num_threads()
torch.set_num_threads(1)  # as in the ranks: tiny matmuls summed in the same order as theirs
reference_model = fresh_model()
reference_optimizer = torch.optim.AdamW(reference_model.parameters(), **ADAMW)
reference_losses = train_steps(reference_model, reference_optimizer, batches()[:STEPS], data_parallel=False)
torch.set_num_threads(threads)
reference_params = {n: p.detach() for n, p in reference_model.named_parameters()}

# fp32 tolerances (those of tests/test_zero.py, where they are derived): the schemes sum each gradient in
# another order (a mean over each rank's sequences, then a sum over ranks), a few ulps apart; AdamW's
# division by sqrt(v) + eps can turn an ulp of gradient into ~1e-6 of parameter over 3 steps at lr 1e-2.
LOSS_RTOL, PARAM_TOL = 1e-5, {"rtol": 1e-4, "atol": 2e-5}
# bf16 gathers: every matmul sees weights rounded to 8 significant bits (relative error up to 2^-9), and the
# loss moves by about that much; 1% leaves a margin over the largest difference seen in the table.
BF16_LOSS_RTOL = 1e-2
BF16 = "FSDP2, bf16 gather, fp32 reduce"
rows, param_errors = [], {}
for scheme, report in trained[0].items():
    loss_error = max(abs(a - b) / b for a, b in zip(report["losses"], reference_losses, strict=True))
    param_errors[scheme] = max(
        (report["params"][n] - p).abs().max().item() for n, p in reference_params.items()
    )
    rows.append((scheme, f"{loss_error:.1e}", f"{param_errors[scheme]:.1e}"))
    for rank, by_rank in trained.items():
        got = by_rank[scheme]
        if scheme == BF16:
            np.testing.assert_allclose(got["losses"], reference_losses, rtol=BF16_LOSS_RTOL, err_msg=scheme)
            continue
        where = f"{scheme}, rank {rank}"
        np.testing.assert_allclose(got["losses"], reference_losses, rtol=LOSS_RTOL, err_msg=where)
        for name, value in got["params"].items():
            torch.testing.assert_close(value, reference_params[name], **PARAM_TOL, msg=f"{where}: {name}")
show_table(["scheme", "largest loss difference (relative)", "largest parameter difference"], rows)
assert param_errors[BF16] > max(e for scheme, e in param_errors.items() if scheme != BF16)
RESULTS["= one process"] = (
    f"{len(rows) - 1} fp32 schemes on {NPROCS} ranks: losses within {LOSS_RTOL:g}, parameters within atol "
    f"{PARAM_TOL['atol']:g} of one process's; bf16 gathers: losses within {BF16_LOSS_RTOL:g}"
)

# %% [markdown]
# Every scheme takes the single process's steps, to fp32 rounding; with bf16 gathers, the losses are the
# reference's to bf16 rounding (section 4 says where the bf16 comes in). Its parameters are not held to a
# tolerance: AdamW divides each gradient by the root of its running square, so a small gradient rounded in
# bf16 can still move its parameter by up to the learning rate, and the table's last column shows them
# further from the reference than any fp32 scheme's (the last assert). Now what a rank holds after
# training: parameters and AdamW's state tensors counted in elements, and how one weight, the first block's
# `wq`, looks on a rank.

# %%
n_params = count_parameters(CONFIG)
holds = {scheme: report["holds"] for scheme, report in trained[0].items()}
show_table(
    ["scheme", "parameter elements", "of the model", "AdamW state elements", "wq is a", "placements",
     "wq on this rank", "block class"],
    [
        (scheme, h["parameter elements"], f"{h['parameter elements'] / n_params:.2f}", h["state elements"],
         h["wq type"], ", ".join(h["wq placements"]), h["wq local shape"], h["block class"])
        for scheme, h in holds.items()
    ],
)  # fmt: skip


def rank0_shard_elements(p: int) -> int:
    """Elements of rank 0's FSDP2 shards on p ranks: ceil(dim0 / p) rows of every parameter."""
    return sum(-(-q.shape[0] // p) * (q.numel() // q.shape[0]) for q in fresh_model().parameters())


for scheme in ("ZeRO-1", "ZeRO-2"):
    assert holds[scheme]["parameter elements"] == n_params, "ZeRO keeps every parameter whole"
    assert holds[scheme]["state elements"] <= 2 * (n_params / NPROCS + len(reference_params)), "states: 1/p"
for scheme, h in holds.items():
    if scheme.startswith("FSDP2"):
        assert h["wq type"] == "DTensor" and h["wq placements"] == ["S(0)"] and h["is FSDPModule"], scheme
        assert h["parameter elements"] == rank0_shard_elements(NPROCS), "rank 0: ceil(dim0 / p) rows"
        assert h["state elements"] == 2 * h["parameter elements"], "AdamW's two states, over the shards only"
        assert h["wq local shape"] == (-(-CONFIG.d_model // NPROCS), CONFIG.d_model)

# %% [markdown]
# ZeRO keeps every parameter whole on every rank and shards AdamW's two states (the padding makes them a
# little more than 1/p). Under FSDP2 the parameters themselves are sharded: each is a `DTensor` with
# placement `Shard(0)`, rank r holding rows r·ceil(d/p) onwards, and the block's class has become
# `FSDPBlock`, an `FSDPModule` with `unshard()`, `reshard()` and the `set_*` methods used below. The
# optimizer was built after `fully_shard`, over the DTensors, so its states are shards too, twice the
# parameters' elements. (The row counts use `torch.chunk`'s split: rank 0 holds ceil(d/p) rows, the last
# rank what is left, which may be fewer, or none.)
#
# ## 3. Memory per rank: predicted and measured
#
# `predict_sharded_memory` adds up one rank's parameters, gradients, optimizer states, the schemes' own
# buffers and the activations, phase by phase (its docstring has the formulas), and `measure_sharded_step`
# measures the same step on every rank with `LiveTensorBytes`, the live bytes of tensor storage (a CPU keeps
# no allocator statistics). The model is the week's README table's (`TABLE_CONFIG`: d_model 128, 4 layers, a
# vocabulary of 512, 2 x 32 tokens per rank, fp32, foreach AdamW), large enough that the terms the schemes
# change outweigh the activations. The assert holds every prediction to within 15% of the most loaded rank's
# measured peak, and checks the order of the peaks that the lecture's table gives.

# %%
measured = measure_every_scheme(NPROCS)
predicted = {
    (scheme if scheme != "fsdp2" or reshard else "fsdp2 (keep gathered)"): predict_sharded_memory(
        TABLE_CONFIG, TABLE_BATCH, TABLE_SEQ, NPROCS, scheme, reshard_after_forward=reshard
    )
    for scheme, reshard in TABLE_RUNS
}
peaks = {name: max(by_rank[name].peak for by_rank in measured.values()) for name in predicted}
show_table(
    ["scheme", "parameters", "gradients", "optimizer states", "predicted peak", "measured peak", "error",
     "peak phase (predicted)"],
    [
        (name, f"{p.parameters / MiB:.2f}", f"{p.gradients / MiB:.2f}", f"{p.optimizer_states / MiB:.2f}",
         f"{p.peak / MiB:.2f}", f"{peaks[name] / MiB:.2f}", f"{p.peak / peaks[name] - 1:+.1%}", p.peak_phase)
        for name, p in predicted.items()
    ],
)  # fmt: skip
print(f"MiB per rank on {NPROCS} ranks; measured: the most loaded rank's peak of live tensor storage")
fig, ax = plt.subplots(figsize=(9, 3.5))
names, xs = list(predicted), np.arange(len(predicted))
terms = ("parameters", "gradients", "optimizer_states")
bottom = np.zeros(len(names))
for term in terms:  # what a rank holds at the optimizer step, stacked
    values = np.array([getattr(predicted[n], term) / MiB for n in names])
    ax.bar(xs - 0.2, values, 0.4, bottom=bottom, label=term.replace("_", " "))
    bottom += values
ax.bar(xs + 0.2, [peaks[n] / MiB for n in names], 0.4, color="k", label="measured peak")
ax.scatter(xs + 0.2, [predicted[n].peak / MiB for n in names], color="r", marker="_", s=400, zorder=3,
           label="predicted peak")  # fmt: skip
ax.set_xticks(xs, names)
ax.set_ylabel(f"MiB per rank ({NPROCS} ranks)")
ax.set_title("Per-rank memory of one AdamW step: the state each scheme keeps, and the step's peak")
ax.legend(fontsize=8, ncol=2)
plt.show()
errors = {name: p.peak / peaks[name] - 1 for name, p in predicted.items()}
assert all(abs(e) <= 0.15 for e in errors.values()), errors
assert peaks["ddp"] > peaks["zero1"] > peaks["zero2"] > peaks["fsdp2"], "each stage shards one more term"
assert peaks["fsdp2 (keep gathered)"] > peaks["fsdp2"], "keeping every block gathered costs memory"
RESULTS["memory"] = f"{NPROCS} ranks, MiB: " + ", ".join(f"{n} {peaks[n] / MiB:.2f}" for n in names)

# %% [markdown]
# The bars on the left are what each rank keeps from step to step and at the optimizer step, the black bars
# the measured peak and the red marks the predicted one. DDP keeps everything whole (and its gradient buckets
# on top); ZeRO-1 divides the optimizer states by p, ZeRO-2 the gradients too, FSDP2 the parameters as
# well. The peak falls in that order (the assert). Besides the state, every scheme's peak holds the
# activations of this rank's batch, which no data-parallel scheme shards, and each scheme's own buffers:
# DDP's buckets, ZeRO's shard copies, FSDP2's gathered blocks and gathered root. Every prediction is within
# 15% of the measurement (the table's error column); the phase in the last column is where the predictor
# puts the peak.
#
# ## 4. FSDP2's knobs: what each one sends, and what it keeps
#
# FSDP2 exchanges parameters and gradients, never activations, so what each scheme sends follows from the
# parameters' shapes alone. A dispatch mode in `fsdp_runs.py` (`CollectiveLog`) records every collective a
# rank calls during one training step: its kind, its whole message (the gathered output of an all-gather,
# the input of a reduce-scatter), the dtype and the number of ranks taking part. Each rank's share of the
# traffic is week 4's: a ring all-gather or reduce-scatter over k ranks sends (k-1)/k of the message from
# each rank (`cost_model.bus_bandwidth_factor`), an all-reduce twice that.
#
# The expected messages, from the parameters' shapes: FSDP2 pads each parameter's dim 0 to a multiple of
# p and gathers a unit (a block, or the root) in one all-gather; ZeRO pads each flattened parameter and sends
# one collective per parameter.

# %%
KINDS = ("all-gather", "reduce-scatter", "all-reduce")
logs = {scheme: report["collectives"] for scheme, report in trained[0].items()}


def sent_per_rank(calls) -> float:
    """Bytes one rank sends for these collectives with ring algorithms (week 4's bus-bandwidth factors)."""
    return sum(c.nbytes * bus_bandwidth_factor(c.kind.replace("-", "_"), c.group_size) for c in calls)


show_table(
    ["scheme (one step)", *(f"{k}s: calls, MiB" for k in KINDS), "ranks per collective", "dtypes",
     "MiB sent per rank"],
    [
        (scheme, *(f"{sum(c.kind == k for c in calls)}, {sum(c.nbytes for c in calls if c.kind == k) / MiB:.3f}"
                   for k in KINDS),
         ", ".join(sorted({f"{c.kind} {c.group_size}" for c in calls})),
         ", ".join(sorted({c.dtype for c in calls})), f"{sent_per_rank(calls) / MiB:.3f}")
        for scheme, calls in logs.items()
    ],
)  # fmt: skip

model = fresh_model()
units = {f"block {i}": list(block.parameters()) for i, block in enumerate(model.layers)}
units["root"] = [p for n, p in model.named_parameters() if not n.startswith("layers.")]


def fsdp_bytes(params, p: int, itemsize: int = 4) -> int:
    """One unit's all-gather message under FSDP2 on p ranks: every dim 0 padded to a multiple of p."""
    return sum(-(-q.shape[0] // p) * p * (q.numel() // q.shape[0]) for q in params) * itemsize


def messages(calls, kind: str) -> Counter:
    return Counter((c.nbytes, c.group_size) for c in calls if c.kind == kind)


unit_bytes = {name: fsdp_bytes(params, NPROCS) for name, params in units.items()}
forward = Counter((b, NPROCS) for b in unit_bytes.values())  # every unit, gathered before its forward
fsdp2 = logs["FSDP2"]
assert messages(fsdp2, "all-gather") == forward + forward, "every unit before its forward and its backward"
assert messages(fsdp2, "reduce-scatter") == forward, "one reduce-scatter per unit"
assert messages(logs["FSDP2, keep gathered"], "all-gather") == forward, "no re-gather in the backward"
zero_bytes = Counter((-(-p.numel() // NPROCS) * NPROCS * 4, NPROCS) for p in model.parameters())
for scheme in ("ZeRO-1", "ZeRO-2"):
    assert messages(logs[scheme], "reduce-scatter") == messages(logs[scheme], "all-gather") == zero_bytes
ddp_sent = 2 * (NPROCS - 1) / NPROCS * n_params * 4  # DDP: one all-reduce of every gradient
ratio = sent_per_rank(fsdp2) / ddp_sent
print(
    f"FSDP2 sends {ratio:.2f}x DDP's all-reduce per rank; ZeRO-1 {sent_per_rank(logs['ZeRO-1']) / ddp_sent:.2f}x"
)
assert 1.5 <= ratio < 1.6, "ZeRO-3's 1.5x of the lecture, plus the padding"
RESULTS["traffic"] = f"FSDP2 sends {ratio:.2f}x what DDP's all-reduce sends per rank ({NPROCS} ranks)"

# %% [markdown]
# The counts are the lecture's: **FSDP2** all-gathers every unit before its forward, again before its
# backward, and reduce-scatters every unit's gradients once: 1.5 times DDP's traffic, plus the padding.
# (`apply_fsdp` passes `reshard_after_forward=True` to the root as well, so the root is re-gathered too;
# `fully_shard`'s default, None, would keep the root gathered, as on the lecture's FSDP2 slide.) **ZeRO-1
# and ZeRO-2** send exactly the bytes of an all-reduce, as a reduce-scatter and an all-gather per
# parameter (one collective per parameter: the from-scratch version has no buckets). Now the knobs, each
# read off the same table.
#
# ### `reshard_after_forward`: True, False, or an int
#
# - `True`: free a unit's gathered parameters after its forward, gather them again for its backward.
# - `False`: keep them from the forward to the backward: no second all-gather (the assert above), and every
#   unit stays gathered until its backward, which section 3 measured as the higher peak.
# - an int k, a divisor of p other than 1 and p: after the forward, keep a 1/k shard instead of the 1/p one,
#   so the backward re-gathers over k ranks only (on a GPU cluster: inside a node, over NVLink). It needs
#   p >= 4, so the small run (2 ranks) skips it.
#
# Below: the all-gathers of the backward for each setting, and, for the int, the peak memory measured as in
# section 3 (in fresh ranks), between the other two.

# %%
reshard_rows = [("True", messages(fsdp2, "all-gather") - forward), ("False", Counter())]
reshard_peaks = {"True": peaks["fsdp2"], "False": peaks["fsdp2 (keep gathered)"]}
if NPROCS >= 4:
    k = NPROCS // 2
    to_k = logs[f"FSDP2, reshard to {k}"]
    reshard_rows.append((str(k), messages(to_k, "all-gather") - forward))
    assert messages(to_k, "all-gather") - forward == Counter((b, k) for b in unit_bytes.values()), (
        "the backward re-gathers every unit (the root too: an int applies to it) over k ranks"
    )
    kept = on_ranks(measure_reshard_to, args=(k,))
    reshard_peaks[str(k)] = max(m.peak for m in kept.values())
    assert reshard_peaks["True"] < reshard_peaks[str(k)] < reshard_peaks["False"], "memory in between"
else:
    print(f"reshard_after_forward as an int needs 4 ranks or more: {NPROCS} here")
show_table(
    ["reshard_after_forward", "backward all-gathers", "over ranks", "MiB gathered", "peak (section 3's model), MiB"],
    [
        (name, sum(regather.values()), ", ".join(sorted({str(g) for _, g in regather})) or "-",
         f"{sum(b * n for (b, _), n in regather.items()) / MiB:.3f}", f"{reshard_peaks[name] / MiB:.2f}")
        for name, regather in reshard_rows
    ],
)  # fmt: skip

# %% [markdown]
# The trade in one table: `True` pays a second all-gather of every unit for the least memory, `False` saves
# it and keeps every unit gathered, and an int re-gathers over fewer ranks for memory in between (checked
# at 4 ranks). torchtitan reshards every block but the last (needed first in the backward), and none under
# pipeline parallelism, where each micro-batch would re-gather.
#
# ### `MixedPrecisionPolicy`: bf16 on the wire and in the matmuls, fp32 where it adds up
#
# `MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)`, torchtitan's default:
# the shards stay fp32 (the optimizer's master weights: no separate copy), each all-gather casts them to
# bf16 first, so the block computes in bf16; the gradients are reduce-scattered in fp32. gloo can all-gather
# bf16 tensors, so this runs here. The assert: the all-gathers move exactly half of FSDP2's fp32 bytes, and
# the reduce-scatters the same.

# %%
bf16 = logs[BF16]
gathered = {s: sum(c.nbytes for c in logs[s] if c.kind == "all-gather") for s in ("FSDP2", BF16)}
reduced = {s: sum(c.nbytes for c in logs[s] if c.kind == "reduce-scatter") for s in ("FSDP2", BF16)}
print({kind: sorted({c.dtype for c in bf16 if c.kind == kind}) for kind in KINDS[:2]})
print(f"all-gathered: {gathered[BF16] / MiB:.3f} MiB in bf16 against {gathered['FSDP2'] / MiB:.3f} in fp32")
assert {c.dtype for c in bf16 if c.kind == "all-gather"} == {"bfloat16"}
assert {c.dtype for c in bf16 if c.kind == "reduce-scatter"} == {"float32"}
assert 2 * gathered[BF16] == gathered["FSDP2"] and reduced[BF16] == reduced["FSDP2"]
assert holds[BF16]["parameter elements"] == holds["FSDP2"]["parameter elements"], "the same shards..."
assert all(p.dtype == torch.float32 for p in trained[0][BF16]["params"].values()), "...in fp32"
assert holds[BF16]["state elements"] == 2 * holds[BF16]["parameter elements"], "AdamW's states: shards too"

# %% [markdown]
# This is module-level mixed precision: the cast happens once per unit, at the all-gather, and the
# activations a block saves for its backward are bf16, where `torch.autocast` casts at every op. What it
# does not change is the state (the last asserts): fp32 shards, fp32 gradient shards (the reduce-scatter's
# dtype) and AdamW's two states over the shards, 16 bytes per parameter in all, 16/p per rank.
#
# ### Explicit prefetching
#
# Each all-gather should be done before its block needs it. On a GPU, FSDP2 issues block i+1's all-gather
# from the CPU as soon as block i's kernels are queued (implicit prefetching, on its own stream).
# `block.set_modules_to_forward_prefetch([...])` makes it explicit: right after a block's own all-gather,
# issue the listed blocks' too (and `set_modules_to_backward_prefetch` in the backward). With
# `PREFETCH` = 2 blocks ahead, more all-gathers are in flight, and more gathered blocks alive. The
# `CollectiveLog` notes when each block's forward starts; the cell counts the blocks whose all-gather was
# issued before block i began its forward.

# %%
print(inspect.getsource(fsdp_prefetching))


def gathered_before_each_block(calls) -> list[int]:
    """For each block i: how many block all-gathers of the forward were issued before block i started."""
    forward_blocks = [c.before_block for c in calls if c.kind == "all-gather" and c.before_block is not None]
    issued = [sum(b <= i for b in forward_blocks) - 1 for i in range(CONFIG.n_layers)]  # less the root's
    return issued


L = CONFIG.n_layers
prefetched = f"FSDP2, prefetch {PREFETCH}"
ahead = {scheme: gathered_before_each_block(logs[scheme]) for scheme in ("FSDP2", prefetched)}
show_table(
    ["blocks all-gathered when block i starts", *(f"block {i}" for i in range(L))],
    [(scheme, *a) for scheme, a in ahead.items()],
)
assert ahead["FSDP2"] == [i + 1 for i in range(L)], "on a CPU, each block gathers itself when it starts"
assert ahead[prefetched] == [min(i + 1 + PREFETCH, L) for i in range(L)], f"{PREFETCH} blocks ahead"
assert messages(logs[prefetched], "all-gather") == messages(fsdp2, "all-gather"), "the same all-gathers"

# %% [markdown]
# With explicit prefetching, block 0's pre-forward hook issues the all-gathers of blocks 1 and 2 right after
# its own; block 1's issues block 3's, and so on: the same messages (the last assert), issued earlier. On a
# CPU with gloo there is nothing to overlap (the ranks' cores compute and communicate alike), so this shows
# the order, and section 7 is where a trace shows the overlap; the price is memory, up to `PREFETCH` more
# gathered blocks at once.
#
# ### `CPUOffloadPolicy`
#
# `fully_shard(..., offload_policy=CPUOffloadPolicy(pin_memory=True))` keeps the sharded parameters, their
# gradients and the optimizer state in host memory; each all-gather first copies the shard to the GPU, each
# reduce-scatter's output goes back, and AdamW steps on the CPU. Here the ranks are CPU processes, so
# everything already lives in host memory: the policy runs (with `pin_memory=False`, since pinning is for
# copies to a GPU) and trains exactly like FSDP2 (section 2's table), but it cannot save anything. Section 7
# measures what it saves on a GPU.

# %%
offload = "FSDP2, CPU offload"
assert trained[0][offload]["losses"] == trained[0]["FSDP2"]["losses"], "the same step, bit for bit"
assert all(
    torch.equal(value, trained[0]["FSDP2"]["params"][name])
    for name, value in trained[0][offload]["params"].items()
), "the same parameters, bit for bit"
assert messages(logs[offload], "all-gather") == messages(fsdp2, "all-gather")

# %% [markdown]
# ## 5. HSDP, and FSDP inside torchtitan
#
# **HSDP** shards within groups and replicates across them: a 2-D mesh (replicate, shard). With 2 groups of
# p/2 ranks (on a cluster: a node each), the all-gathers and reduce-scatters run inside a group, and an
# all-reduce of each rank's gradient shard runs across the groups. Memory per rank is that of sharding over
# p/2 ranks, whatever the number of groups; the network carries only the all-reduce of 1/(p/2) of the
# gradients. Section 2 trained it like one process; its collectives:

# %%
hsdp_name = f"HSDP (2 x {NPROCS // 2})"
hsdp = logs[hsdp_name]
group = NPROCS // 2
show_table(
    ["HSDP collective", "calls", "ranks taking part", "MiB"],
    [
        (kind, sum(c.kind == kind for c in hsdp), ", ".join(sorted({str(c.group_size) for c in hsdp if c.kind == kind})),
         f"{sum(c.nbytes for c in hsdp if c.kind == kind) / MiB:.3f}")
        for kind in KINDS
    ],
)  # fmt: skip
shard_bytes = {name: fsdp_bytes(params, group) // group for name, params in units.items()}
assert Counter(c.nbytes for c in hsdp if c.kind == "all-reduce") == Counter(shard_bytes.values()), (
    "one all-reduce per unit, of this rank's gradient shard"
)
assert {c.group_size for c in hsdp if c.kind == "all-reduce"} == {2}, "across the 2 replicas"
if group > 1:  # with 2 ranks, each shard group is one rank: nothing to gather
    assert {c.group_size for c in hsdp if c.kind != "all-reduce"} == {group}, "inside a shard group"
assert holds[hsdp_name]["wq placements"] == ["R", "S(0)"], "replicated over dim 0, sharded over dim 1"

# %% [markdown]
# Each unit's gradient is reduce-scattered inside its group and its shard all-reduced across the two groups
# (the asserts); a parameter's placements are `(Replicate(), Shard(0))` on the 2-D mesh. With 2 ranks (the
# small run) each group is a single rank, so HSDP degenerates into DDP with shards of one: no all-gathers,
# one all-reduce per unit.
#
# **How torchtitan composes FSDP with TP and PP** (read in its `parallelize` code for Llama and its
# `ParallelDims`; described here, not copied):
#
# - One `DeviceMesh` holds every dimension, `pp`, `dp_replicate`, `dp_shard`, `cp`, `tp`, with `tp` the
#   fastest-varying (consecutive ranks, so inside a node). `ParallelDims` checks that their product is the
#   world size, and builds flattened sub-meshes such as `dp_shard_cp` (data and context parallel ranks both
#   see different tokens, so both must sum their gradients).
# - Pipeline parallelism splits the model first, into stages; each stage's model is then parallelized in a
#   fixed order: tensor parallelism (parameters become DTensors sharded over `tp`, week 5), activation
#   checkpointing, `torch.compile` per block, and FSDP last, so that it shards the parameters as they finally
#   are. A TP-sharded weight sharded again by FSDP is a DTensor on two mesh dimensions, e.g. `(Shard(0),
#   Shard(1))` on (dp_shard, tp); FSDP's all-gather restores only the dp dimension.
# - FSDP is applied to the token embeddings, to each block, to the final norm with the output layer, and
#   then to the whole model, with `MixedPrecisionPolicy(bf16, fp32)` and a reshard policy: by default every
#   block but the last resharded after its forward, and none under pipeline parallelism. With
#   `dp_replicate` > 1 the same calls on a 2-D mesh give HSDP.
# - Under pipeline parallelism the schedules turn off the gradient reduction (and the reshard after
#   backward) of a stage until its last micro-batch, so each stage reduce-scatters once per step.
#
# ## 6. Distributed checkpoints: save on N ranks, load on N/2
#
# `common.distributed.fsdp.save_checkpoint` writes the model's and AdamW's state with
# `torch.distributed.checkpoint` (DCP): every rank writes its own shards, and rank 0 writes the metadata that
# says where each piece sits in the whole tensor. In section 2 the FSDP2 ranks saved after `STEPS` steps and
# trained `MORE_STEPS` more. Now half as many ranks build a fresh model, `load_checkpoint` (each rank reads
# the pieces its new, larger shards cover) and train the same `MORE_STEPS` steps: the losses and parameters
# must be those of the uninterrupted run.

# %%
files = sorted(path.name for path in CHECKPOINT.iterdir())
print(f"{CHECKPOINT.relative_to(REPO_ROOT)}: {files}")
assert ".metadata" in files and sum(name.endswith(".distcp") for name in files) == NPROCS, "a file per rank"
metadata = dcp.FileSystemReader(str(CHECKPOINT)).read_metadata()
wq = metadata.state_dict_metadata["model.layers.0.attention.wq.weight"]
print(f"wq saved as {len(wq.chunks)} chunks of the whole {tuple(wq.size)}: "
      f"{[(tuple(c.offsets), tuple(c.sizes)) for c in wq.chunks]}")  # fmt: skip
M = max(NPROCS // 2, 1)
resumed = on_ranks(resume, M, args=(str(CHECKPOINT),))
uninterrupted = trained[0]["FSDP2"]
for rank, report in resumed.items():
    # The two runs average gradients over N and N/2 ranks: fp32 sums in another order (section 2's tolerance).
    np.testing.assert_allclose(
        report["losses"], uninterrupted["continued"], rtol=LOSS_RTOL, err_msg=str(rank)
    )
    for name, value in report["params"].items():
        expected_value = uninterrupted["continued params"][name]
        torch.testing.assert_close(value, expected_value, **PARAM_TOL, msg=f"rank {rank}: {name}")
untrained = fresh_model()
untrained_optimizer = torch.optim.AdamW(untrained.parameters(), **ADAMW)
fresh_losses = train_steps(untrained, untrained_optimizer, batches()[STEPS:], data_parallel=False)
show_table(
    ["run", *(f"loss at step {STEPS + i + 1}" for i in range(MORE_STEPS))],
    [(f"uninterrupted, {NPROCS} ranks", *(f"{v:.5f}" for v in uninterrupted["continued"])),
     (f"resumed from the checkpoint, {M} ranks", *(f"{v:.5f}" for v in resumed[0]["losses"])),
     ("a fresh model on the same batches", *(f"{v:.5f}" for v in fresh_losses))],
)  # fmt: skip
assert abs(fresh_losses[0] - uninterrupted["continued"][0]) > 0.01, "the checkpoint mattered"
RESULTS["checkpoint"] = f"saved on {NPROCS} ranks, resumed on {M}: the same losses and parameters"

# %% [markdown]
# The checkpoint is a folder with a file per saving rank and the metadata: each of `wq`'s chunks is stored
# with its offset in the whole tensor, so a reader with another layout knows which file holds which rows.
# Loaded on half the ranks, training continues with the uninterrupted run's losses and parameters (to the
# rounding of sums taken over a different number of ranks), and a fresh model's losses are visibly different,
# so the test could fail. Resharding was a read plan, not a conversion.
#
# ## 7. On the GPU: a trace, a memory snapshot, MFU, and CPU offload
#
# Everything below runs only where `DEVICE == "cuda"`, on one GPU: a 1-rank NCCL group, so FSDP2's hooks,
# streams and casts all run. With one rank there is nothing to gather: FSDP2 (torch 2.11) skips the
# all-gather and copies each unit's shard, the whole parameter, into its unsharded parameter, so the trace has
# no `FSDP::all_gather` range (the assert checks that too). `gpu_tour` (in `fsdp_runs.py`) trains
# the 350M preset at 8 x 1024 tokens (the 125M preset at 2 x 512 in small mode) with bf16 gathers and fp32
# reductions, and measures:
#
# - the step time with `common.bench`, and the **MFU**: `training_flops` (week 5's count, matmuls only) over
#   the step time, over the GPU's dense bf16 peak (`common.hardware`);
# - the peak memory of a steady step (`torch.cuda.max_memory_allocated`) with and without `CPUOffloadPolicy`:
#   the assert checks that offloading lowers it (the sharded state moves to host memory);
# - a **profiler trace** of three steps, written to `build/week06_fsdp/` (open it in
#   [Perfetto](https://ui.perfetto.dev): FSDP2's ranges, `FSDP::pre_forward`, `FSDP::post_backward_reshard`
#   and others, name each unit's hooks), and a **memory snapshot** of one step (drop it on https://pytorch.org/memory_viz: the
#   sawtooth of gathered blocks on top of the activations' staircase).
#
# No numbers are quoted here: the cell prints them, and the committed notebook will hold them once it is
# recorded on a GPU.

# %%
if DEVICE == "cuda":
    gpu_config, gpu_batch, gpu_seq = (
        (LlamaConfig.preset("125m"), 2, 512) if SMALL else (LlamaConfig.preset("350m"), 8, 1024)
    )
    on_gpu = launch(gpu_tour, 1, args=(gpu_config, gpu_batch, gpu_seq, str(WORK)), backend="nccl",
                    timeout_s=900, start_method="spawn")[0]  # fmt: skip
    runs = {name: on_gpu[name] for name in ("FSDP2", "FSDP2, CPU offload")}
    show_table(
        ["one GPU, bf16 gathers, fp32 reduce", "step, ms", "MFU", "peak memory, GiB"],
        [(name, f"{r['step_ms']:.1f}", f"{r['mfu']:.1%}", f"{r['peak_bytes'] / 2**30:.2f}") for name, r in runs.items()],
    )  # fmt: skip
    written = [(WORK / name).relative_to(REPO_ROOT) for name in ("fsdp2_trace.json", "fsdp2_snapshot.pickle")]
    print(f"written: {', '.join(map(str, written))}\nFSDP2's ranges in the trace: {on_gpu['fsdp ranges']}")
    print(f"the snapshot: {on_gpu['snapshot']}")
    assert runs["FSDP2, CPU offload"]["peak_bytes"] < runs["FSDP2"]["peak_bytes"], (
        "offload moves the state out"
    )
    ranges = on_gpu["fsdp ranges"]
    assert any(n.startswith("FSDP::pre_forward") for n in ranges), "the trace names FSDP2's hooks"
    assert not any(n.startswith("FSDP::all_gather") for n in ranges), "one rank: no all-gather to run"
    assert 0 < runs["FSDP2"]["mfu"] < 1
    RESULTS["GPU"] = ", ".join(
        f"{name}: {r['step_ms']:.1f} ms, MFU {r['mfu']:.1%}, peak {r['peak_bytes'] / 2**30:.2f} GiB"
        for name, r in runs.items()
    )
else:
    print("section 7 needs a CUDA GPU: skipped on this machine")

# %% [markdown]
# ## Summary
#
# - A DTensor is a global tensor and a placement per mesh dimension; changing a placement is a collective
#   (Shard to Replicate: all-gather; Partial to Shard: reduce-scatter; Partial to Replicate: all-reduce), and
#   FSDP2's parameters are `Shard(0)` DTensors.
# - ZeRO-1, ZeRO-2, FSDP2 with each knob, and HSDP train like one process on the whole batch; sharded
#   schemes keep 1/p of what they shard, and their per-rank peaks fall in the order DDP, ZeRO-1, ZeRO-2,
#   FSDP2, each within 15% of its prediction.
# - FSDP2 sends an all-gather per unit in the forward, again in the backward, and a reduce-scatter per
#   unit: 1.5 times DDP's all-reduce, plus padding. `reshard_after_forward=False` drops the second all-gather for
#   memory, an int re-gathers over fewer ranks; bf16 gathers halve the all-gathers and keep fp32 shards;
#   explicit prefetching issues the same all-gathers earlier; CPU offload moves the state to host memory.
# - A DCP checkpoint saved on N ranks loads on N/2 and training continues exactly.

# %% tags=["summary"]
for key, line in RESULTS.items():
    print(f"{key}: {line}")
