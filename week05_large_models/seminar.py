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
# # Week 5 seminar: training models that do not fit
#
# A model trained with AdamW in fp32 needs 16 bytes per parameter for its weights, gradients and AdamW's two
# states, about 17 GB for 1B parameters (section 1's table), and its activations grow with every token of
# the batch. This seminar first asks where a training step's memory goes, then tries the ways to make it
# fit on one GPU, and then cuts the model over several:
#
# 1. **Memory anatomy**: parameters, gradients, optimizer states and activations, predicted term by term for
#    several model sizes by `common.memory.anatomy`, and checked against what a step really holds.
# 2. **Activation checkpointing**: keep less for the backward and recompute the rest; none, selective and
#    full, what each keeps and what each recomputes.
# 3. **Offloading**: keep weights and optimizer states in host memory and copy them in when they are needed,
#    with and without prefetching the next block's weights.
# 4. **Tensor parallelism** (Megatron-LM), with **sequence parallelism**, and the same split through
#    PyTorch's DTensor API.
# 5. **Ulysses**: split the sequence, exchange heads for attention.
# 6. **Pipeline parallelism**: GPipe and 1F1B, simulated, drawn and run.
# 7. **What each scheme sends**, counted per step, and priced on a cluster by week 4's cost model.
# 8. **On the GPU**: the measured peaks against the predictions, checkpointing's extra step time, and
#    offloading's throughput and its trace of copies against compute.
#
# Every parallel scheme runs on N ranks started by `common.distributed.launch` (2 at small size, 4 at full
# size), CPU processes that talk through gloo, and is checked against the single-process model: the same
# loss and the same gradients. The ranks are spawned, fresh interpreters that import what they run from
# `parallel_runs.py` beside this notebook: ranks forked from the notebook could not run autograd on a GPU
# machine once the notebook has run a backward pass (autograd then keeps a thread per GPU, which a fork does
# not copy). Sections 1 to 3 run their checks on the CPU and leave the GPU's numbers to section 8, which
# runs only where `DEVICE == "cuda"`.
#
# Cells that state a fact check it with `assert`. A sentence about a GPU measurement says what the cell
# measures and what its `assert` checks; the numbers are the ones printed beside it.

# %% tags=["parameters"]
import os

import torch

# SMALL: 2 ranks, toy sizes (a laptop, CI); full: 4 ranks, and on a GPU the 125M-1B models of section 8.
# `effdl seminar --small/--full` and CI set EFFDL_SMALL; the default is full on a GPU machine, small on a CPU.
SMALL = os.environ.get("EFFDL_SMALL", "0" if torch.cuda.is_available() else "1") == "1"
# Where section 8 measures. The parallel schemes run on gloo CPU ranks on every machine.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# %%
import inspect
import json
import time

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import display
from parallel_runs import (  # beside this notebook: what the ranks of sections 4 and 6 run
    MICRO,
    PBATCH,
    PCONFIG,
    PSEQ,
    VARIANTS,
    all_variants,
    both_schedules,
    fresh_model,
    parallel_batch,
    parallel_step,
)

from common.distributed import cost_model
from common.distributed.launch import launch
from common.distributed.pipeline import (
    SCHEDULES,
    Timeline,
    activations_in_flight,
    bubble_formula,
    plot_timeline,
    simulate,
)
from common.distributed.tensor_parallel import (
    bytes_sent_per_rank,
    communication_volume,
)
from common.environment import environment
from common.hardware import SPECS
from common.memory.anatomy import measure_saved_activations, measure_step_memory, predict_step_memory
from common.memory.checkpointing import (
    OpCounter,
    apply_activation_checkpointing,
    measure_checkpointing,
    saved_activation_bytes,
)
from common.memory.offload import (
    HostOptimizer,
    apply_parameter_offload,
    measure_offload,
    offload_activations,
    record_timeline,
)
from common.models.llama import (
    Llama,
    LlamaConfig,
    count_parameters,
    layer_matmul_parameters,
    random_batch,
    training_flops,
)
from common.tables import show_table
from common.weeks import REPO_ROOT

BACKEND = "gloo"
NPROCS = 2 if SMALL else 4  # ranks of every launch below
GB = 1e9
RESULTS: dict[str, str] = {}  # one line per key result; the summary cell at the end prints them
# Profiler traces go to build/ (ignored by git), printed relative to the repository.
WORK = REPO_ROOT / "build" / "week05_large_models"
WORK.mkdir(parents=True, exist_ok=True)
machine = environment("cpu")  # not the GPU's yet: asking CUDA about it would initialize CUDA (see above)
print(
    f"sizes: {'small' if SMALL else 'full'}; {NPROCS} ranks on {BACKEND}; CPU: {machine['cpu']}, "
    f"{os.cpu_count()} cores; section 8 {'on the GPU' if DEVICE == 'cuda' else 'skipped (no GPU)'}; "
    f"torch {torch.__version__}"
)

# %% [markdown]
# ## 1. Memory anatomy: where a training step's memory goes
#
# The course's Llama (`common.models.llama`) comes in named sizes. Two larger shapes are added here, for
# questions we can only answer on paper: Llama-2-7B's and Llama-2-70B's widths, depths and heads, with the
# same 32000-token vocabulary (Touvron et al. 2023, table 1 and the released configs).

# %%
LLAMA_7B = LlamaConfig(
    vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, d_ff=11008, max_seq_len=4096
)
LLAMA_70B = LlamaConfig(
    vocab_size=32000, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, d_ff=28672, max_seq_len=4096
)
CONFIGS = {name: LlamaConfig.preset(name) for name in ("125m", "350m", "1b")} | {
    "7b": LLAMA_7B,
    "70b": LLAMA_70B,
}
show_table(
    ["model", "d_model", "layers", "heads (kv)", "d_ff", "parameters", "training GFLOP/token at s=2048"],
    [
        (
            name,
            c.d_model,
            c.n_layers,
            f"{c.n_heads} ({c.n_kv_heads})",
            c.d_ff,
            f"{count_parameters(c) / 1e9:.3f} B",
            f"{training_flops(c, 1, 2048) / 1e9:.1f}",
        )
        for name, c in CONFIGS.items()
    ],
)
assert 6.5e9 < count_parameters(LLAMA_7B) < 7e9 and 68e9 < count_parameters(LLAMA_70B) < 70e9

# %% [markdown]
# `predict_step_memory` adds up what one AdamW step holds, term by term (its docstring derives each term):
# parameters, gradients and the optimizer's two states, all in fp32 here, and the activations that autograd
# keeps for the backward, in bf16 under autocast. The peak is not their sum: gradients exist only from the
# backward on, and activations are freed as the backward walks down the blocks, so the predictor also says
# *when* in the step the peak comes.
#
# Below: a batch of 8 sequences of 2048 tokens, for every size. The table gives the terms and the peak, the
# chart draws them side by side (on a log scale: the sizes span more than three orders of magnitude).
# H200's memory, 141 GB (NVIDIA H200 datasheet), is drawn as a line.

# %%
BATCH, SEQ = 8, 2048
HBM_H200 = 141e9  # bytes; NVIDIA H200 datasheet: 141 GB HBM3e
predicted = {
    name: predict_step_memory(c, BATCH, SEQ, param_dtype=torch.float32, compute_dtype=torch.bfloat16)
    for name, c in CONFIGS.items()
}
TERMS = ("parameters", "gradients", "optimizer_states", "activations", "loss_buffers")
show_table(
    ["model", *(t.replace("_", " ") + ", GB" for t in TERMS), "peak, GB", "peak comes"],
    [
        (
            name,
            *(f"{getattr(m, t) / GB:.1f}" for t in TERMS),
            f"{m.peak / GB:.1f}",
            m.peak_phase.split(" (")[0],
        )
        for name, m in predicted.items()
    ],
)
fig, ax = plt.subplots(figsize=(9, 3.5))
x, width = np.arange(len(predicted)), 0.14
for k, term in enumerate((*TERMS, "peak")):  # side by side, not stacked: the peak is not their sum
    values = [getattr(m, term) / GB for m in predicted.values()]
    ax.bar(
        x + (k - 2.5) * width,
        values,
        width,
        label=term.replace("_", " "),
        color="k" if term == "peak" else None,
    )
ax.axhline(HBM_H200 / GB, color="r", linestyle="--", label="H200, 141 GB")
ax.set_xticks(x, list(predicted))
ax.set_yscale("log")
ax.set_ylabel("GB (log scale)")
ax.set_title(f"Predicted memory of one AdamW step, batch {BATCH} x {SEQ} tokens, fp32 weights, bf16 autocast")
ax.legend(fontsize=8, loc="upper left")
plt.show()
fits = [name for name, m in predicted.items() if m.peak <= HBM_H200]
print(f"fit on one H200 by the prediction: {', '.join(fits)}")
states_7b = predicted["7b"].parameters + predicted["7b"].gradients + predicted["7b"].optimizer_states
print(
    f"7b: weights, gradients and AdamW states {states_7b / GB:.0f} GB, {states_7b / HBM_H200:.0%} of an H200"
)
assert predicted["1b"].peak < HBM_H200 < predicted["7b"].peak, "the 1B model fits one H200, the 7B does not"
assert states_7b > HBM_H200 / 2, "...and the 7B model's states take more than half of it before any token"
assert all(m.activations == max(getattr(m, t) for t in TERMS) for m in predicted.values()), "the largest term"
assert all(m.peak_phase.startswith("backward, at the loss") for m in predicted.values()), (
    "where the peak comes"
)
RESULTS["anatomy"] = f"predicted peak at {BATCH}x{SEQ}: " + ", ".join(
    f"{name} {m.peak / GB:.0f} GB" for name, m in predicted.items()
)

# %% [markdown]
# Two things to read in the table. The 7B model does not fit one 141-GB GPU this way: its weights,
# gradients and AdamW states alone take more than half of it (printed, and the second assert) before a
# single activation is kept. And at this batch the activations are no small term: for every size they are
# the largest of the five (the third assert). The peak comes at the start of the backward (the fourth
# assert), where the loss holds three fp32 tensors of batch x sequence x vocabulary (the log-probabilities
# and two gradients): the 32000-word vocabulary is costly.
#
# A prediction is worth what its check is. On this machine's CPU, `measure_step_memory` reads a real
# step's peak from the profiler's memory timeline (slow, so a small model), and `measure_saved_activations`
# counts the bytes autograd keeps; section 8 holds the same predictor to CUDA's allocator for the sizes
# above. On the CPU there is no autocast: fp32 throughout, and the CPU's attention saves what "flash" does.

# %%
toy = LlamaConfig(vocab_size=512, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=352, max_seq_len=256)
toy_batch, toy_seq = (2, 64) if SMALL else (4, 256)
torch.manual_seed(0)
toy_model = Llama(toy)
cpu_predicted = predict_step_memory(toy, toy_batch, toy_seq)
cpu_measured = measure_step_memory(toy_model, toy_batch, toy_seq)
saved = measure_saved_activations(toy_model, *random_batch(toy, toy_batch, toy_seq))
show_table(
    ["toy model on the CPU, fp32", "predicted, MB", "measured, MB", "error"],
    [
        ("activations saved for backward", f"{cpu_predicted.activations / 1e6:.2f}", f"{saved / 1e6:.2f}",
         f"{saved / cpu_predicted.activations - 1:+.1%}"),
        ("peak of the step", f"{cpu_predicted.peak / 1e6:.2f}", f"{cpu_measured.peak / 1e6:.2f}",
         f"{cpu_measured.peak / cpu_predicted.peak - 1:+.1%}"),
    ],
)  # fmt: skip
assert abs(saved / cpu_predicted.activations - 1) < 0.10, "activations predicted within 10%"
assert abs(cpu_measured.peak / cpu_predicted.peak - 1) < 0.10, "the peak predicted within 10%"

# %% [markdown]
# ## 2. Activation checkpointing
#
# Most of the activations are kept only so that the backward can use them. `apply_activation_checkpointing`
# wraps each block so that its forward keeps less and recomputes the rest during the backward:
#
# - **full**: a block keeps only its input and runs its whole forward again in the backward: the least
#   memory, for one more forward per step (about a third more matmul FLOPs);
# - **selective**: a block keeps the outputs of its matmuls and attention (costly to recompute) and
#   recomputes only the cheap elementwise ops (norms, rotary, SiLU).
#
# On the toy model, below: the same gradients in all three modes; the bytes held for the backward
# (`saved_activation_bytes` counts the storages a forward leaves alive, the logits included); and, with
# `OpCounter`, the matmuls each mode runs in a forward and backward. The cell checks that selective runs
# not one matmul more than no checkpointing, and full runs more.

# %%
tokens, targets = random_batch(toy, toy_batch, toy_seq)


def checkpointed(mode: str) -> tuple[dict[str, torch.Tensor], int, int]:
    """The seeded toy model under a checkpointing mode: its gradients, its matmuls, the bytes it holds."""
    torch.manual_seed(0)
    model = Llama(toy)
    if mode != "none":
        apply_activation_checkpointing(model, mode)
    held = saved_activation_bytes(model, tokens)  # what a forward leaves alive for the backward
    with OpCounter() as ops:
        model.loss(tokens, targets).backward()
    # A checkpointed block's parameters are named layers.i.block.*: drop "block." to compare by name.
    return {n.replace(".block.", "."): p.grad for n, p in model.named_parameters()}, ops.matmuls, held


modes = ("none", "selective", "full")
runs = {mode: checkpointed(mode) for mode in modes}
show_table(
    ["mode", "held for backward, MB", "matmuls in forward + backward"],
    [(mode, f"{runs[mode][2] / 1e6:.2f}", runs[mode][1]) for mode in modes],
)
for mode in ("selective", "full"):
    grads = runs[mode][0]
    assert all(torch.allclose(grads[n], g, rtol=1e-5, atol=1e-7) for n, g in runs["none"][0].items()), mode
held = {mode: runs[mode][2] for mode in modes}
assert held["full"] < held["selective"] < held["none"], "each mode keeps less than the one before"
assert runs["selective"][1] == runs["none"][1], "selective checkpointing re-runs no matmul"
assert runs["full"][1] > runs["none"][1], "full checkpointing re-runs every block's matmuls"
full_1b = predict_step_memory(
    CONFIGS["1b"], BATCH, SEQ, param_dtype=torch.float32, compute_dtype=torch.bfloat16, checkpointing="full"
)
print(
    f"the 1B model at {BATCH}x{SEQ}, predicted: activations {predicted['1b'].activations / GB:.1f} GB without "
    f"checkpointing, {full_1b.activations / GB:.1f} GB with full checkpointing; peak "
    f"{predicted['1b'].peak / GB:.1f} -> {full_1b.peak / GB:.1f} GB"
)
assert full_1b.activations < predicted["1b"].activations / 4

# %% [markdown]
# The three modes give the same gradients (to fp32 rounding: the assert's tolerance), and hold less in that
# order. What they cost in time is left to section 8, which measures it on the 1B model on a GPU, where
# the question matters: a shared CI machine's timings could not hold a claim.
#
# ## 3. Offloading
#
# Host memory is larger than the GPU's, and slower to reach: PCIe 5.0 x16 is specified at 64 GB/s each way,
# where the H200's HBM moves 4.8 TB/s (its datasheet). `apply_parameter_offload` keeps every block's
# weights in (pinned) host memory and copies a block in just before its forward and again before its
# backward; with **prefetch**, block i+1's copy runs on a side stream while block i computes.
# `HostOptimizer` keeps AdamW's states on the host and steps there. `offload_activations` sends the tensors
# saved for backward to the host and brings them back when the backward needs them.
#
# Every one of them also runs with device "cpu" (each copy a plain copy), which is how we check here that
# none changes the result: one AdamW step with offloaded weights, the optimizer on the host, and activations
# offloaded, against the plain model's step. Section 8 measures what they cost on a GPU.


# %%
def adamw_step(offloaded: bool) -> dict[str, torch.Tensor]:
    """One AdamW step of the seeded toy model, plainly or with everything offloaded; the weights after it."""
    torch.manual_seed(0)
    model = Llama(toy)
    if not offloaded:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model.loss(tokens, targets).backward()
        optimizer.step()
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    offload = apply_parameter_offload(model, "cpu")
    optimizer = HostOptimizer(offload.parameters(), lr=1e-3)
    with offload_activations(model) as activations:
        model.loss(tokens, targets).backward()
    optimizer.step()
    offload.remove()
    print(f"activations sent to the host and back: {activations.bytes_offloaded / 1e6:.2f} MB")
    return {n: p.detach().clone() for n, p in model.named_parameters()}


plain, offloaded = adamw_step(offloaded=False), adamw_step(offloaded=True)
assert plain.keys() == offloaded.keys()
assert all(torch.allclose(offloaded[n], w, rtol=1e-6, atol=1e-7) for n, w in plain.items()), "the same step"
optimizer_share = predicted["1b"].optimizer_states / predicted["1b"].peak
print(f"AdamW's states are {optimizer_share:.0%} of the 1B model's predicted peak at {BATCH}x{SEQ}")

# %% [markdown]
# ## 4. Tensor parallelism, and sequence parallelism
#
# When the weights themselves do not fit, or one layer's work is too much for one GPU, the layers are cut.
# Megatron-LM (Shoeybi et al. 2019) cuts each block into "column then row" pairs: q, k, v by heads and then
# the output projection by its input rows; the MLP's w1 and w3 by hidden units and then w2 by rows. Each rank
# computes its heads and its hidden units from the whole input, with no communication, and the block's
# output is the sum of the ranks' partial outputs: one all-reduce after attention and one after the MLP in
# the forward, and their twins (before attention and before the MLP) in the backward.
#
# Between those regions (norms, residual adds) plain tensor parallelism computes the same thing on every
# rank. **Sequence parallelism** (Korthikanti et al. 2022) splits the sequence there instead: the
# all-reduce becomes a reduce-scatter (each rank keeps its slice of the sum) and the entry an all-gather.
# `apply_tensor_parallel_dtensor` makes the same split with PyTorch's own API (DTensor, as torchtitan does).
#
# The check: each variant, on `NPROCS` gloo ranks, gives the single-process model's loss and every
# parameter's gradient, gathered back to its full shape from the shards the ranks hold. The cell also counts
# the collectives each rank calls, to compare with section 7's formulas.

# %%
TOLERANCE = 1e-5  # relative to each tensor's largest entry: sums reordered across ranks, in fp32
# What each rank runs is in parallel_runs.py beside this notebook (spawned ranks import it by name):
print(inspect.getsource(parallel_step))


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    return (
        float("inf")
        if got.shape != expected.shape
        else ((got - expected).abs().max() / expected.abs().max()).item()
    )


reference = fresh_model()
reference_loss = reference.loss(*parallel_batch())
reference_loss.backward()
reference_grads = {n: p.grad for n, p in reference.named_parameters()}
start = time.perf_counter()
parallel = launch(all_variants, NPROCS, backend=BACKEND, timeout_s=600, start_method="spawn")
print(f"{len(VARIANTS)} variants on {NPROCS} ranks: {time.perf_counter() - start:.1f} s")
rows = []
for variant in VARIANTS:
    for rank, result in parallel.items():
        r = result[variant]
        assert r["grads"].keys() == reference_grads.keys(), "the same parameters, by name"
        worst = max(relative_difference(r["grads"][n], g) for n, g in reference_grads.items())
        loss_error = abs(r["loss"] - reference_loss.item()) / reference_loss.item()
        assert worst < TOLERANCE and loss_error < TOLERANCE, f"{variant} on rank {rank}: {worst:.2e}"
    share = parallel[0][variant]["block_weights"] / sum(p.numel() for p in reference.layers.parameters())
    rows.append((variant, f"{loss_error:.1e}", f"{worst:.1e}", f"{share:.2f}"))
show_table(["variant", "loss, rel. error", "worst gradient, rel. error", "block weights held per rank"], rows)
split_share = PCONFIG.n_layers * (layer_matmul_parameters(PCONFIG) // NPROCS + 2 * PCONFIG.d_model)
for variant in ("tp", "tp_sp", "dtensor", "dtensor_sp"):
    assert parallel[0][variant]["block_weights"] == split_share, "1/p of the matmul weights, all the norms"
assert parallel[0]["ulysses"]["block_weights"] == sum(p.numel() for p in reference.layers.parameters())
RESULTS["parallel = single process"] = (
    f"{', '.join(VARIANTS)} on {NPROCS} gloo ranks: loss and every gradient within {TOLERANCE:g} (relative)"
)

# %% [markdown]
# Every variant's loss and gradients agree with the single process to within the tolerance (sums reordered
# across ranks move the last bits of fp32). The tensor-parallel variants hold 1/`NPROCS` of every block's
# matmul weights on each rank (a little more: the norms' weights are replicated); Ulysses holds them all.
#
# ## 5. Ulysses: split the sequence, exchange heads
#
# DeepSpeed-Ulysses (Jacobs et al. 2023) keeps every weight whole and gives each rank a slice of the
# sequence. Everything but attention works token by token, so only attention needs the whole sequence: one
# all-to-all turns "my positions, all heads" into "all positions, my heads" for q, k and v, attention runs
# per head, and a second all-to-all turns the output back. Its check is in the table above, the last row;
# its gradients are averaged by data parallelism (week 4's `apply_ddp`), since each rank saw only its
# tokens. What it sends, against tensor parallelism, is section 7's question.
#
# ## 6. Pipeline parallelism: GPipe and 1F1B
#
# Cut the model by depth instead: stage s holds consecutive blocks, activations flow forward stage to stage
# and their gradients flow back. One batch keeps one stage busy at a time, so the batch is cut into m
# micro-batches. GPipe (Huang et al. 2019) runs every forward and then every backward; 1F1B
# (PipeDream-Flush, Narayanan et al. 2021) starts each micro-batch's backward as early as it can. With a
# backward costing twice a forward, both idle a fraction (p - 1)/(m + p - 1) of the time, the bubble; 1F1B
# holds at most p micro-batches' activations on the first stage where GPipe holds m. The schedules are
# data: simulated on paper below, then run for real.

# %%
P_STAGES = NPROCS  # MICRO = 8 micro-batches, from parallel_runs.py
simulated = {name: simulate(schedule, P_STAGES, MICRO) for name, schedule in SCHEDULES.items()}
for name, timeline in simulated.items():
    display(plot_timeline(timeline, f"{name}, simulated: {P_STAGES} stages, {MICRO} micro-batches"))
in_flight = {
    name: activations_in_flight(schedule(P_STAGES, MICRO, 0)) for name, schedule in SCHEDULES.items()
}
show_table(
    ["schedule", "bubble (simulated)", "(p-1)/(m+p-1)", "micro-batches held by stage 0"],
    [
        (name, f"{t.bubble_fraction:.3f}", f"{bubble_formula(P_STAGES, MICRO):.3f}", in_flight[name])
        for name, t in simulated.items()
    ],
)
assert all(abs(t.bubble_fraction - bubble_formula(P_STAGES, MICRO)) < 1e-9 for t in simulated.values())
assert in_flight == {"gpipe": MICRO, "1f1b": P_STAGES}, "GPipe holds m micro-batches, 1F1B holds p"

# %% [markdown]
# Now for real: each of `NPROCS` ranks builds the same model, keeps its stage (`split_into_stages`), and
# `pipeline_step` runs its list of actions, sending activations and gradients to its neighbours. Each
# micro-batch's loss is divided by m, so the accumulated gradients are the whole batch's: the cell checks
# them against the single process, and draws the step's measured timeline (on gloo CPU ranks, so the shape
# of the schedule, not GPU timings).


# %%
reference = fresh_model()
pipeline_loss = reference.loss(*random_batch(PCONFIG, MICRO, PSEQ, seed=1))
pipeline_loss.backward()
reference_grads = {n: p.grad for n, p in reference.named_parameters()}
stages = launch(both_schedules, NPROCS, backend=BACKEND, timeout_s=600, start_method="spawn")
for name in SCHEDULES:
    grads = {n: g for rank in stages for n, g in stages[rank][name]["grads"].items()}
    assert grads.keys() == reference_grads.keys(), "the stages hold the whole model between them"
    worst = max(relative_difference(grads[n], g) for n, g in reference_grads.items())
    loss = stages[NPROCS - 1][name]["loss"]
    assert worst < TOLERANCE and abs(loss - pipeline_loss.item()) < TOLERANCE * pipeline_loss.item(), name
    held = [stages[rank][name]["in_flight"] for rank in stages]
    print(f"{name}: worst gradient {worst:.1e} (relative); micro-batches held per stage {held}")
    display(plot_timeline(Timeline([stages[r][name]["spans"] for r in stages]), f"{name}, measured on gloo"))
    assert held[0] == (MICRO if name == "gpipe" else NPROCS)
RESULTS["pipeline"] = (
    f"GPipe and 1F1B on {NPROCS} stages, {MICRO} micro-batches: the single process's gradients"
)

# %% [markdown]
# ## 7. What each scheme sends, and what it would cost on a cluster
#
# `communication_volume` lists the collectives of one training step for tensor parallelism (4 all-reduces
# of the activations per layer), with sequence parallelism (the same bytes, as all-gathers and
# reduce-scatters) and Ulysses (all-to-alls of q, k, v and the output, whose size falls as 1/p, plus the
# gradient all-reduce of data parallelism). First, the formula against what the ranks of section 4 really
# called, collective by collective (the DTensor variants call torch's functional collectives, which the
# count does not see).

# %%
for variant, scheme in (("tp", "tp"), ("tp_sp", "tp_sp"), ("ulysses", "ulysses")):
    counted = parallel[0][variant]["counts"]
    formula = communication_volume(scheme, PCONFIG, PBATCH, PSEQ, NPROCS)
    show_table(
        [f"{variant}: collective", "message bytes", "calls (formula)", "calls (counted on rank 0)"],
        [
            (c.kind, c.nbytes, c.calls, counted.get((c.kind, c.nbytes), 0))
            for c in formula
            if not (scheme == "ulysses" and c.kind == "all_reduce")  # checked by its total below
        ],
    )
    for c in formula:
        if scheme == "ulysses" and c.kind == "all_reduce":  # in DDP's buckets: compare what they add up to
            bucketed = sum(n * k for (kind, n), k in counted.items() if kind == "all_reduce")
            assert bucketed == c.nbytes, (bucketed, c.nbytes)
        else:
            assert counted[(c.kind, c.nbytes)] == c.calls, (variant, c)

# %% [markdown]
# The counts match the formulas. Now the question we cannot measure here: a 7B-like and a 70B-like model on
# one node of 8 GPUs, 8 sequences of 4096 tokens per step, bf16 activations, each GPU link priced by week 4's
# cost model with its own NVLink constant (`cost_model.NVLINK_H100`: 3 µs, 450 GB/s each way, the H100
# datasheet's 900 GB/s both ways). Pipeline parallelism's point-to-point traffic is added by hand: each of
# the p - 1 stage boundaries carries every micro-batch's activation forward and its gradient back, b s d B
# per direction in all. Beside it, the step's compute time on 8 GPUs at the H100 SXM's dense bf16 peak
# (`common.hardware.SPECS`, from NVIDIA's whitepaper) and an assumed 40% of it: the question is whether the
# communication is small next to it.

# %%
LINK, WORLD, B, S, BYTES = cost_model.NVLINK_H100, 8, 8, 4096, 2
PEAK = SPECS["H100 SXM"].peak_flops["bf16"]
MFU = 0.4  # assumed fraction of peak that training reaches: an assumption, not a measurement
rows, at_scale = [], {}
for name, config in (("7b", LLAMA_7B), ("70b", LLAMA_70B)):
    compute_s = training_flops(config, B * S, S) / (WORLD * PEAK * MFU)
    for scheme in ("tp", "tp_sp", "ulysses"):
        volume = communication_volume(scheme, config, B, S, WORLD, BYTES)
        seconds = sum(c.calls * c.cost(WORLD).time(LINK) for c in volume)
        at_scale[(name, scheme)] = seconds
        rows.append((name, scheme, f"{bytes_sent_per_rank(volume, WORLD) / GB:.1f}", f"{seconds * 1e3:.0f}",
                     f"{compute_s * 1e3:.0f}", f"{seconds / compute_s:.0%}"))  # fmt: skip
    boundary = B * S * config.d_model * BYTES  # one direction of one boundary, all micro-batches together
    seconds = 2 * boundary * LINK.beta + 2 * MICRO * LINK.alpha_s  # a stage's sends: forward and backward
    at_scale[(name, "pipeline")] = seconds
    rows.append((name, f"pipeline ({MICRO} micro-batches)", f"{2 * boundary / GB:.2f}", f"{seconds * 1e3:.1f}",
                 f"{compute_s * 1e3:.0f}", f"{seconds / compute_s:.0%}"))  # fmt: skip
show_table(
    [
        "model",
        "scheme on 8 GPUs",
        "GB sent per rank",
        "comm., ms",
        "compute at 40% of peak, ms",
        "comm./compute",
    ],
    rows,
)
for name in ("7b", "70b"):
    assert at_scale[(name, "pipeline")] < at_scale[(name, "tp")], "pipeline stages send far less than TP"
RESULTS["at scale"] = "8 GPUs on NVLink (model): " + ", ".join(
    f"{n} {s} {t * 1e3:.0f} ms" for (n, s), t in at_scale.items()
)

# %% [markdown]
# How to read it (a prediction from datasheet rates, not a measurement): tensor parallelism's traffic per
# rank does not shrink with p, and the table shows how its communication time compares with the compute
# it splits; sequence parallelism sends the same bytes as plain tensor parallelism in the blocks (it saves
# memory, not bandwidth). Ulysses' activations traffic falls as 1/p, but it pays the whole gradient
# all-reduce, which data parallelism pays anyway; and a pipeline stage sends only the activations at its
# boundaries, the least of all (the assert), at the price of the bubble of section 6. Which one to use, and
# how to combine them, is a question of which of these terms fits under the compute: Megatron-LM keeps
# tensor parallelism inside a node's NVLink and pipelines across nodes (Narayanan et al. 2021).
#
# ## 8. On the GPU: measured
#
# Everything below runs only where `DEVICE == "cuda"`; the committed notebook holds a run on one H200. The
# sizes are chosen so that every model fits in its memory with room to spare: the 1B model with AdamW at
# 8 x 2048 tokens is predicted at the peak printed in section 1, and the cells of 8.2 and 8.3 print the
# predicted peak of what they run and check that it is under 80% of the GPU's memory.
#
# **8.1 The memory predictor against CUDA's allocator.** For the 125M, 350M and 1B models at 8 x 2048
# tokens (in small mode, the 125M model at 2 x 512: large enough that what the predictor leaves out, such
# as cuBLAS's workspace, stays a small part of the peak): one AdamW step with fp32 weights under bf16
# autocast, its peak from `torch.cuda.max_memory_allocated`, against `predict_step_memory` with "flash"
# attention (what SDPA picks for bf16). The assert checks that every prediction is within 10% of the
# measured peak.

# %%
SMALL_GPU = (CONFIGS["125m"], 2, 512)  # the size of every GPU cell in small mode
if DEVICE == "cuda":
    gpu = environment(DEVICE)
    print(f"GPU: {gpu['gpu']}, {gpu['memory_bytes'] / GB:.0f} GB")
    gpu_sizes = (
        {"125m": SMALL_GPU} if SMALL else {n: (CONFIGS[n], BATCH, SEQ) for n in ("125m", "350m", "1b")}
    )
    measured_peaks = {}  # name -> (predicted, measured) peak in bytes
    for name, (config, batch, seq) in gpu_sizes.items():
        torch.manual_seed(0)
        model = Llama(config).to(DEVICE)
        step = measure_step_memory(model, batch, seq, compute_dtype=torch.bfloat16)
        prediction = predict_step_memory(
            config, batch, seq, param_dtype=torch.float32, compute_dtype=torch.bfloat16
        )
        measured_peaks[name] = (prediction.peak, step.peak)
        del model
        torch.cuda.empty_cache()
    show_table(
        ["model", "predicted peak, GB", "measured peak, GB", "error"],
        [(n, f"{p / GB:.2f}", f"{m / GB:.2f}", f"{m / p - 1:+.1%}") for n, (p, m) in measured_peaks.items()],
    )
    fig, ax = plt.subplots(figsize=(6, 3))
    x = np.arange(len(measured_peaks))
    ax.bar(x - 0.2, [p / GB for p, _ in measured_peaks.values()], 0.4, label="predicted")
    ax.bar(x + 0.2, [m / GB for _, m in measured_peaks.values()], 0.4, label="measured")
    ax.set_xticks(x, list(measured_peaks))
    ax.set_ylabel("peak of one AdamW step, GB")
    ax.legend()
    plt.show()
    assert all(abs(m / p - 1) <= 0.10 for p, m in measured_peaks.values()), "predicted within 10% of measured"
    RESULTS["predictor on the GPU"] = ", ".join(
        f"{n} {m / p - 1:+.1%}" for n, (p, m) in measured_peaks.items()
    )

# %% [markdown]
# **8.2 Checkpointing: memory saved against time added.** `measure_checkpointing` times a forward and
# backward of the 1B model in bf16 (8 x 2048 tokens; the 125M model at 2 x 512 in small mode) in each
# mode with `common.bench`, and reports the step's peak memory above the model. The asserts check the
# bounds this week sets: full checkpointing adds at most 35% to the step time and selective at most 15%,
# and each mode holds less memory at its peak than the one before. (The times are checked at full size
# only, on the ~1B model the bounds are set for.)

# %%
if DEVICE == "cuda":
    config, batch, seq = SMALL_GPU if SMALL else (CONFIGS["1b"], BATCH, SEQ)
    expected = predict_step_memory(config, batch, seq, param_dtype=torch.bfloat16, optimizer="sgd")
    print(
        f"predicted peak without checkpointing: {expected.peak / GB:.1f} GB of {gpu['memory_bytes'] / GB:.0f} GB"
    )
    assert expected.peak < 0.8 * gpu["memory_bytes"]
    checkpointing_gpu = measure_checkpointing(config, batch, seq, device=DEVICE, dtype=torch.bfloat16)
    base = checkpointing_gpu["none"]
    show_table(
        ["mode", "step, ms", "extra time", "peak above the model, GB", "held for backward, GB"],
        [
            (m.mode, f"{m.step_ms:.1f}", f"{m.step_ms / base.step_ms - 1:+.1%}",
             f"{m.peak_memory_bytes / GB:.2f}", f"{m.saved_activation_bytes / GB:.2f}")
            for m in checkpointing_gpu.values()
        ],
    )  # fmt: skip
    extra = {mode: checkpointing_gpu[mode].step_ms / base.step_ms - 1 for mode in ("selective", "full")}
    peaks = {mode: checkpointing_gpu[mode].peak_memory_bytes for mode in modes}
    assert peaks["full"] < peaks["selective"] < peaks["none"], "each mode holds less than the one before"
    if not SMALL:
        assert extra["selective"] <= 0.15, f"selective checkpointing added {extra['selective']:.0%}"
        assert extra["full"] <= 0.35, f"full checkpointing added {extra['full']:.0%}"
        assert extra["selective"] < extra["full"]
    RESULTS["checkpointing"] = ", ".join(
        f"{mode}: {extra[mode]:+.0%} time, peak {peaks[mode] / GB:.1f} GB (none {peaks['none'] / GB:.1f} GB)"
        for mode in extra
    )

# %% [markdown]
# **8.3 Offloading: throughput, and a trace of copies against compute.** `measure_offload` times the
# forward and backward of the 1B model in bf16, with 16 x 2048 tokens (the 125M model at 2 x 512 in small
# mode), with
# its block weights on the GPU, offloaded without prefetch, and offloaded with prefetch. The batch is large
# on purpose: offloading pays only when each block's copy can hide behind that block's compute, and the
# compute grows with the tokens while the copies do not. The assert checks, at full size, that offloading
# with prefetch keeps at least 70% of the no-offload throughput, and that its peak device memory (the
# model's resident part included) is below the plain model's. (Activation offloading,
# `offload_activations`, is left out of the timing: at this batch it would pin tens of GB of host memory
# per step.)

# %%
if DEVICE == "cuda":
    config, batch, seq = SMALL_GPU if SMALL else (CONFIGS["1b"], 16, SEQ)
    # A forward and backward without an optimizer: SGD's prediction (no states), bf16 throughout.
    expected = predict_step_memory(config, batch, seq, param_dtype=torch.bfloat16, optimizer="sgd")
    print(
        f"predicted peak of the plain step: {expected.peak / GB:.1f} GB of {gpu['memory_bytes'] / GB:.0f} GB"
    )
    assert expected.peak < 0.8 * gpu["memory_bytes"], "the plain model fits, with room for the allocator"
    offload_gpu = measure_offload(
        config, batch, seq, variants=("none", "offload", "offload+prefetch"), device=DEVICE
    )
    show_table(
        ["variant", "step, ms", "tokens/s", "of no offload", "peak device memory, GB"],
        [
            (m.variant, f"{m.step_ms:.1f}", f"{m.tokens_per_s:,.0f}",
             f"{m.tokens_per_s / offload_gpu['none'].tokens_per_s:.0%}", f"{m.peak_memory_bytes / GB:.2f}")
            for m in offload_gpu.values()
        ],
    )  # fmt: skip
    kept = offload_gpu["offload+prefetch"].tokens_per_s / offload_gpu["none"].tokens_per_s
    if not SMALL:
        assert kept >= 0.70, f"offload with prefetch kept {kept:.0%} of the throughput"
    assert offload_gpu["offload+prefetch"].peak_memory_bytes < offload_gpu["none"].peak_memory_bytes
    RESULTS["offload"] = f"with prefetch {kept:.0%} of the no-offload throughput"

# %% [markdown]
# Where the time goes: `record_timeline` profiles three steps of each offloaded variant and measures how
# much of the copies' time runs while a compute kernel runs too. The trace files open in
# [Perfetto](https://ui.perfetto.dev); the cell draws their GPU activity, copies above compute, for one step.
# The assert checks that prefetch hides a larger share of the copy time than copying on demand.

# %%
if DEVICE == "cuda":
    config, batch, seq = SMALL_GPU if SMALL else (CONFIGS["1b"], 16, SEQ)
    inputs, labels = random_batch(config, batch, seq, device=DEVICE)
    overlaps = {}
    fig, axes = plt.subplots(2, 1, figsize=(10, 3.5), sharex=False)
    for ax, prefetch in zip(axes, (False, True), strict=True):
        torch.manual_seed(0)
        model = Llama(config).to(dtype=torch.bfloat16)
        offload = apply_parameter_offload(model, DEVICE, prefetch=prefetch)
        params = list(offload.parameters())

        def step(model: Llama = model, params: list = params) -> None:
            model.loss(inputs, labels).backward()
            for p in params:
                p.grad = None

        trace = WORK / f"offload_prefetch_{prefetch}.json"
        overlaps[prefetch] = record_timeline(step, trace_path=trace, steps=3)
        print(f"prefetch={prefetch}: {overlaps[prefetch]}; trace: {trace.relative_to(REPO_ROOT)}")
        # The Chrome trace's GPU activity: "kernel" (compute) and "gpu_memcpy" events, ts and dur in µs.
        events = [
            (e["cat"], float(e["ts"]), float(e.get("dur", 0)))
            for e in json.loads(trace.read_text())["traceEvents"]
            if e.get("cat") in ("kernel", "gpu_memcpy") and "ts" in e
        ]
        first = min(ts for _, ts, _ in events)
        window = overlaps[prefetch].span_ms * 1e3 / 3  # about one of the three steps, in µs
        for cat, ts, dur in events:
            if ts - first <= window:
                row = 1 if cat == "gpu_memcpy" else 0
                ax.broken_barh([((ts - first) / 1e3, dur / 1e3)], (row - 0.4, 0.8),
                               color="tab:orange" if row else "tab:blue")  # fmt: skip
        ax.set_yticks([0, 1], ["compute", "copies"])
        ax.set_title(
            f"prefetch={prefetch}: {overlaps[prefetch].hidden:.0%} of copy time hidden behind compute"
        )
        offload.remove()
        del model, offload, params, step
        torch.cuda.empty_cache()
    axes[-1].set_xlabel("ms from the first kernel of the profiled steps")
    fig.tight_layout()
    plt.show()
    assert overlaps[True].hidden > overlaps[False].hidden, "prefetch hides more of the copies"
    RESULTS["offload trace"] = ", ".join(
        f"prefetch={k}: {v.hidden:.0%} of copy time hidden" for k, v in overlaps.items()
    )

# %% [markdown]
# ## Summary
#
# - A training step holds parameters, gradients, optimizer states and activations; the predictor adds them
#   up phase by phase and says when the peak comes. With AdamW in fp32, a 7B model's states alone take
#   more than half of a 141-GB GPU; at 8 x 2048 tokens the activations are the largest term for every size,
#   and the peak comes where the loss holds its fp32 tensors of the vocabulary's width.
# - Checkpointing trades memory for recomputation: full keeps a block's input only and runs its forward
#   twice; selective keeps the matmul outputs and re-runs no matmul (counted on the CPU). Section 8
#   measures what each costs in time on a GPU.
# - Offloading moves weights and optimizer states to host memory and gives the same step; it pays when the
#   copies hide behind compute, which prefetching the next block's weights is for.
# - Tensor parallelism (Megatron, with or without sequence parallelism, ours or DTensor's), Ulysses and
#   the two pipeline schedules all give the single process's loss and gradients on gloo ranks. What they
#   send per step follows from the shapes alone (the counts match the formulas), and the cost model turns
#   it into time on a cluster we cannot run.

# %% tags=["summary"]
for key, line in RESULTS.items():
    print(f"{key}: {line}")
