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
# # Week 3 seminar: fast training pipelines
#
# A training step is more than a matmul: numbers in some floating-point format, batches that a data loader
# decodes and pads, and a loop that a profiler can take apart. This seminar makes each of them faster, and
# measures what each change buys:
#
# 1. **Number formats**: the range and precision of fp32, TF32, bf16, fp16 and fp8, from their bits.
# 2. **fp16 fails, loss scaling fixes it**: gradients that underflow, `torch.amp.GradScaler`, and why bf16
#    needs no scaler.
# 3. **Speed and memory**: a transformer block trained in fp32, TF32, bf16 and fp16; tensor-core shape
#    alignment; fp8 matmuls with `torch._scaled_mm`; `torch.compile` of the training step.
# 4. **The input pipeline**: `DataLoader` workers and pinned memory, JPEG decoding on the CPU and the GPU,
#    and the cost of padding.
# 5. **Profiling**: `torch.profiler` finds a planted bottleneck in a training step; a host-device sync;
#    the activation memory of a transformer block, by formula and measured; a CUDA memory snapshot of a
#    training step.
#
# All timings go through `common.bench`, peaks come from `common.hardware`, and the helpers of this week
# live in `common.amp`, `common.data` and `common.profiling`. Cells that state a fact check it with `assert`.
# Without a GPU the notebook runs small sizes on the CPU and skips the GPU-only parts; the committed
# `seminar.ipynb` shows a full-size run on a GPU (its metadata names the GPU and the library versions).

# %% tags=["parameters"]
import os

import torch

# SMALL: small sizes for a laptop/CI CPU. `effdl seminar --small/--full` and CI set EFFDL_SMALL; default: full on a GPU.
SMALL = os.environ.get("EFFDL_SMALL", "0" if torch.cuda.is_available() else "1") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# %%
import json
import math
import time
from functools import partial
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch.nn.functional as F
import torchvision
import torchvision.transforms.v2 as v2
from torch import nn
from torch.profiler import record_function
from torch.utils.data import DataLoader

from common import amp, data, hardware, profiling
from common.bench import bench, compare
from common.models.transformer import TransformerBlock, block_flops
from common.tables import show_table
from common.weeks import REPO_ROOT

torch.manual_seed(0)
MiB, GiB = 2**20, 2**30
RESULTS: dict[str, str] = {}  # one line per key result (at most 8); the summary cell at the end prints them
# Generated JPEGs, traces and snapshots go to build/ (ignored by git), printed relative to the repository.
WORK = REPO_ROOT / "build" / "week03_fast_pipelines"
WORK.mkdir(parents=True, exist_ok=True)
SPEC = None
if DEVICE == "cuda":
    try:
        SPEC = hardware.gpu_spec()
    except hardware.UnknownGPUError as error:
        print(f"No datasheet peaks for this GPU, so no fractions of peak below: {error}")


def time_slow(fn, name, reps=3):
    """common.bench for host-side work of 0.1 s or more (an epoch, a batch of JPEGs): a few repetitions.

    Tables of these report the fastest repetition (min_ms): with so few, the median still moves with other
    processes on the machine, and the fastest is the one they disturbed least.
    """
    return bench(fn, name=name, warmup_ms=0, rep_ms=0, min_reps=reps, device="cpu")


print(
    f"device: {DEVICE}, sizes: {'small' if SMALL else 'full'}, torch {torch.__version__}, "
    f"scratch: {WORK.relative_to(REPO_ROOT)}"
)

# %% [markdown]
# ## 1. Number formats: range and precision from the bits
#
# A binary floating-point number is a sign, an exponent and a mantissa. The **exponent bits** set the range:
# the largest value, and the smallest *normal* value below which numbers become *subnormal* (fewer
# significant bits) and then zero. The **mantissa bits** set the precision: machine epsilon, the gap between
# 1 and the next number, is 2^-mantissa, and rounding to nearest is off by at most half of it.
#
# `common.amp.FORMATS` computes all of these from the bit counts (and the tests check them against
# `torch.finfo`). TF32 is not a storage type but the way tensor cores read fp32 inputs: fp32's 8 exponent bits
# with fp16's 10 mantissa bits. fp8 comes in two flavours: e4m3 (more precision, for weights and activations)
# and e5m2 (more range, for gradients); e4m3 "fn" spends no codes on infinity, which buys it one more binade.

# %%
rows = []
for fmt in amp.FORMATS.values():
    rows.append(
        (
            fmt.name,
            fmt.bits,
            f"{fmt.exponent_bits}/{fmt.mantissa_bits}",
            f"{fmt.max:.4g}",
            f"2^{int(math.log2(fmt.eps))} = {fmt.eps:.2g}",
            f"2^{int(math.log2(fmt.smallest_normal))}",
            f"2^{int(math.log2(fmt.smallest_subnormal))}",
        )
    )
show_table(["format", "bits", "exp/mant", "max", "eps", "min normal", "min subnormal"], rows)
F16, BF16 = amp.FORMATS["fp16"], amp.FORMATS["bf16"]
assert F16.max == 65504 and amp.FORMATS["fp8_e4m3"].max == 448 and amp.FORMATS["fp8_e5m2"].max == 57344
assert BF16.smallest_normal == amp.FORMATS["fp32"].smallest_normal, "bf16 has fp32's range"
assert BF16.eps == 8 * F16.eps, "...and 3 fewer mantissa bits than fp16: 8x coarser"

fig, ax = plt.subplots(figsize=(9, 3))
for i, fmt in enumerate(amp.FORMATS.values()):
    lo, mid, hi = (math.log2(v) for v in (fmt.smallest_subnormal, fmt.smallest_normal, fmt.max))
    ax.barh(i, mid - lo, left=lo, color="C0", alpha=0.35, label="subnormal" if i == 0 else None)
    ax.barh(i, hi - mid, left=mid, color="C0", label="normal" if i == 0 else None)
ax.set_yticks(range(len(amp.FORMATS)), list(amp.FORMATS))
ax.axvline(-25, color="C3", linestyle="--", linewidth=1, label="2^-25: at or below it, fp16 rounds to 0")
ax.set_xlabel("log2 of magnitude")
ax.set_title("Representable magnitudes of each format")
ax.invert_yaxis()
ax.legend(loc="lower left", fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# fp16 and bf16 both take 16 bits and split them differently: fp16 keeps precision and loses range (nothing
# above 65504; the smallest subnormal is 2^-24 ≈ 6e-8, and rounding to nearest, ties to even, sends everything
# up to half of it, 2^-25 ≈ 3e-8, to zero), bf16 keeps fp32's range and loses precision. Deep-learning values
# mostly need range: activations can be large, and gradients are often tiny. The next part shows what happens
# to tiny gradients in fp16.
#
# ## 2. Training in fp16 fails; loss scaling fixes it; bf16 needs no scaler
#
# The model is a small language model: token embedding, two residual MLP blocks, and a head over the
# vocabulary, trained to predict the next token of `common.data.SyntheticTokens` (sequences with a learnable
# next-token rule, so we know the best possible loss: `entropy`).
#
# Why gradients are tiny: the loss is a mean over all tokens of a step, so every token's gradient carries a
# factor 1/N. Language models train on steps of 0.5M-4M tokens, split into micro-batches whose losses are
# divided by the number of micro-batches (gradient accumulation). We run one micro-batch per step and give it
# the gradient scale of a 0.5M-token step: the loss is divided by 2^19 tokens. The gradient of a non-target
# logit is then about softmax probability / N, around 1e-9: far below 2^-25, so fp16 rounds it to zero. The
# target's logit gets (probability - 1) / N, about -2^-19: small, but a subnormal that fp16 keeps.

# %%
VOCAB, WIDTH, SEQ, BATCH = (512, 64, 64, 16) if SMALL else (4096, 256, 128, 128)
STEPS = 40 if SMALL else 150
GLOBAL_TOKENS = 2**19  # the optimizer step we emulate: 0.5M tokens
tokens = data.SyntheticTokens(
    BATCH * STEPS, vocab_size=VOCAB, median_length=SEQ + 1, sigma=0, min_length=SEQ + 1, max_length=SEQ + 1
)
token_batches = torch.stack([tokens[i] for i in range(len(tokens))]).view(STEPS, BATCH, SEQ + 1).to(DEVICE)
SHARE = BATCH * SEQ / GLOBAL_TOKENS  # this micro-batch's share of the emulated step


class ResidualMLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, 4 * width)
        self.out = nn.Linear(4 * width, width)

    def forward(self, x):
        return x + self.out(F.gelu(self.fc(self.norm(x))))


def make_lm():
    torch.manual_seed(1)  # every run starts from the same weights
    return nn.Sequential(
        nn.Embedding(VOCAB, WIDTH),
        ResidualMLP(WIDTH),
        ResidualMLP(WIDTH),
        nn.LayerNorm(WIDTH),
        nn.Linear(WIDTH, VOCAB),
    ).to(DEVICE)


def lm_loss(logits, targets):
    """Mean next-token cross-entropy of this micro-batch, scaled to its share of a 0.5M-token step."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()) * SHARE


# Gradients of one fp32 step, captured at the logits and at the input of the head.
model = make_lm()
x, y = token_batches[0, :, :-1], token_batches[0, :, 1:]
hidden = model[:-1](x)
hidden.retain_grad()
logits = model[-1](hidden)
logits.retain_grad()
lm_loss(logits, y).backward()
grads = {
    "logits": logits.grad.flatten(),
    "hidden": hidden.grad.flatten(),
    "weights": torch.cat([p.grad.flatten() for p in model.parameters()]),
}
SCALE = 2.0**16  # GradScaler's initial scale
rows = []
for name, g in grads.items():
    plain, scaled = amp.cast_error(g, "fp16"), amp.cast_error(g * SCALE, "fp16")
    rows.append(
        (
            name,
            g.numel(),
            f"{plain.underflow:.1%}",
            f"{plain.subnormal:.1%}",
            f"{scaled.underflow:.2%}",
            f"{amp.cast_error(g, 'bf16').underflow:.1%}",
        )
    )
show_table(["gradient", "n", "fp16: zero", "fp16: subnormal", "fp16 x 2^16: zero", "bf16: zero"], rows)

fig, ax = plt.subplots(figsize=(9, 3.5))
bins = np.linspace(-50, 0, 101)
for name, g in grads.items():
    g = g[g != 0].abs().double().log2().cpu().numpy()
    ax.hist(g, bins=bins, histtype="step", linewidth=1.5, density=True, label=f"{name} gradients")
ax.axvspan(bins[0], -25, color="C3", alpha=0.12, label="fp16: becomes 0")
ax.axvspan(-25, -14, color="C1", alpha=0.12, label="fp16: subnormal")
ax.axvline(-25 - 16, color="k", linestyle=":", label="what x 2^16 lifts to 2^-25")
ax.set_xlabel("log2 |gradient| (fp32 training step)")
ax.set_ylabel("density")
ax.set_title("Gradients of one step, against fp16's range")
ax.legend(fontsize=8, loc="upper left")
plt.tight_layout()
plt.show()

underflow = amp.cast_error(grads["logits"], "fp16").underflow
assert underflow > 0.5, f"most logit gradients underflow in fp16, got {underflow:.0%}"
assert amp.cast_error(grads["logits"] * SCALE, "fp16").underflow < 0.01, "scaled by 2^16, they survive"
assert all(amp.cast_error(g, "bf16").underflow == 0 for g in grads.values()), "bf16 has fp32's range"


def net_push(g):
    """Sum over a token's vocabulary of its logit gradients, over the sum of their magnitudes (all tokens)."""
    g = g.double().view(-1, VOCAB)
    return (g.sum(-1).abs().sum() / g.abs().sum()).item()


# Softmax cross-entropy pushes the target's logit up by as much as it pushes all the others down: a token's
# logit gradients sum to zero. In fp16 the pushes down are flushed to zero and the push up survives.
logits16 = grads["logits"].half()
survivors = logits16[logits16 != 0]
fp32_push, fp16_push = net_push(grads["logits"]), net_push(logits16)
print(
    f"logit gradients left non-zero in fp16: {survivors.numel()} of {logits16.numel()}, "
    f"{(survivors < 0).float().mean():.1%} of them negative (a target's);\n"
    f"|sum over the vocabulary| / sum of |gradients|: {fp32_push:.1e} in fp32, {fp16_push:.3f} in fp16"
)
assert fp32_push < 1e-3 and fp16_push > 0.9, "fp16 keeps the target's push up and loses the pushes down"
del model, hidden, logits, logits16, survivors

# %% [markdown]
# Now we train the same model five ways, with `common.amp.train_step` (autocast, then PyTorch's
# `torch.amp.GradScaler` where the policy needs one):
#
# - **fp32**: the reference;
# - **pure fp16**: weights, gradients and the optimizer's state in fp16 (`model.half()`);
# - **fp16 autocast, no scaler**: fp32 weights, fp16 matmuls; `train_step` refuses this combination, so we
#   write that loop by hand;
# - **fp16 autocast + GradScaler**: the loss is multiplied by the scale before backward, the gradients are
#   divided by it before the optimizer step (and steps with inf/NaN gradients are skipped);
# - **bf16 autocast**: no scaler.


# %%
def train(policy_name, use_scaler=True):
    """Train a fresh model for STEPS steps; return the per-step losses (the true loss, not the scaled one)."""
    model = make_lm()
    policy = amp.precision(policy_name)
    policy.prepare(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scaler = policy.grad_scaler(DEVICE) if use_scaler else None
    losses = []  # kept on the device: .item() every step would be a host-device sync
    for batch in token_batches:
        x, y = batch[:, :-1], batch[:, 1:]
        if use_scaler:
            loss = amp.train_step(model, x, y, lm_loss, optimizer, policy, scaler=scaler)
        else:  # what train_step refuses to do: fp16 autocast without loss scaling
            optimizer.zero_grad(set_to_none=True)
            with policy.autocast(DEVICE):
                loss = lm_loss(model(x), y)
            loss.backward()
            optimizer.step()
        losses.append(loss.detach().float())
    scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else None
    return (torch.stack(losses) / SHARE).cpu().numpy(), scale


runs = {}
start = time.perf_counter()
runs["fp32"], _ = train("fp32")
runs["pure fp16"], _ = train("pure-fp16")
runs["fp16 autocast, no scaler"], _ = train("fp16", use_scaler=False)
runs["fp16 autocast + GradScaler"], final_scale = train("fp16")
runs["bf16 autocast"], _ = train("bf16")
print(f"5 runs of {STEPS} steps in {time.perf_counter() - start:.1f} s")


def final(losses):
    return float(np.mean(losses[-5:]))


show_table(
    ["run", "first loss", "final loss (last 5)"],
    [(name, f"{losses[0]:.3f}", f"{final(losses):.3f}") for name, losses in runs.items()],
)
print(
    f"GradScaler's scale at the end: 2^{math.log2(final_scale):.0f}; best possible loss {tokens.entropy:.3f}"
)

# Three runs end on the same curve: each gets a line style and markers of its own (fp32 is the wide grey
# band), and the right panel shows how far the two that overlap fp32 are from it.
styles = {
    "fp32": dict(color="0.6", linewidth=5, alpha=0.6),
    "pure fp16": dict(color="C3", marker="x"),
    "fp16 autocast, no scaler": dict(color="C1", marker="^"),
    "fp16 autocast + GradScaler": dict(color="C0", linestyle="--", marker="o", markevery=(0, 10)),
    "bf16 autocast": dict(color="C2", linestyle=":", marker="s", markevery=(5, 10)),
}
fig, (ax, ax_diff) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [3, 2]})
for name, losses in runs.items():
    finite = np.isfinite(losses)
    style = {"linewidth": 1.2, "markersize": 4, "markevery": 10, **styles[name]}
    if finite.all():
        ax.plot(losses, label=name, **style)
    else:  # NaN is not drawn: mark every finite step, and where the NaNs begin
        nan_from = int(np.argmin(finite))
        style.update(markevery=1, markersize=8, zorder=5)
        ax.plot(np.where(finite, losses, np.nan), label=f"{name} (NaN from step {nan_from})", **style)
        ax.axvline(nan_from, color=style["color"], linestyle=(0, (1, 3)), linewidth=1.5)
ax.axhline(tokens.entropy, color="k", linestyle=":", linewidth=1, label="best possible (entropy)")
ax.axhline(math.log(VOCAB), color="k", linestyle="-.", linewidth=1, label="uniform guess, ln V")
ax.set_xlabel("step")
ax.set_ylabel("next-token loss (nats)")
ax.set_title("The same model and data, five precisions")
ax.legend(fontsize=8)
for name in ("fp16 autocast + GradScaler", "bf16 autocast"):
    ax_diff.plot(runs[name] - runs["fp32"], label=name, **{"linewidth": 1.2, "markersize": 4, **styles[name]})
ax_diff.axhline(0, color="0.6", linewidth=5, alpha=0.6, label="fp32")
ax_diff.set_xlabel("step")
ax_diff.set_ylabel("loss minus fp32's loss (nats)")
ax_diff.set_title("The runs that overlap fp32 on the left")
ax_diff.legend(fontsize=8)
plt.tight_layout()
plt.show()

reference = final(runs["fp32"])
assert abs(final(runs["fp16 autocast + GradScaler"]) - reference) < 0.08, "loss scaling recovers fp32's loss"
assert abs(final(runs["bf16 autocast"]) - reference) < 0.1, "bf16 trains like fp32 without a scaler"
no_scaler = runs["fp16 autocast, no scaler"]
if SMALL:  # 40 steps: long enough to see the loss turn back up, too short for it to cross ln V
    assert final(no_scaler) > no_scaler.min() + 0.1 and final(no_scaler) > reference + 0.3, (
        f"without scaling, fp16's loss turns back up: min {no_scaler.min():.2f}, final {final(no_scaler):.2f}"
    )
else:
    assert final(no_scaler) > math.log(VOCAB), (
        f"without scaling, fp16 diverges: final loss {final(no_scaler):.2f} > ln V = {math.log(VOCAB):.2f}"
    )
pure = final(runs["pure fp16"])
assert not np.isfinite(pure) or pure > reference + 0.3, "pure fp16 fails"
RESULTS["fp16"] = (
    f"{underflow:.0%} of logit gradients underflow; final loss fp32 {reference:.2f}, fp16+scaler "
    f"{final(runs['fp16 autocast + GradScaler']):.2f}, bf16 {final(runs['bf16 autocast']):.2f}, "
    f"no scaler {final(runs['fp16 autocast, no scaler']):.2f}, pure fp16 {pure:.2f}"
)

# %% [markdown]
# Reading the curves:
#
# - Without a scaler, fp16 autocast does worse than learn slowly: at full size the loss climbs above ln V, the
#   loss of a uniform guess (the assert checks it). The first cell of this part shows why. A token's logit
#   gradients are (probability - 1) / N for its target and probability / N for every other word; they sum to
#   zero. In fp16 the second kind rounds to zero while the first survives as a subnormal, so what reaches the
#   model only ever says "raise the target's logit", never "lower the others" (the printed sums: near 0 in
#   fp32, near 1 in fp16). And AdamW divides each gradient by the root of
#   its running mean square, so a tiny gradient of a consistent sign becomes a step of full size, about the
#   learning rate: the weights move as fast as in fp32, in a biased direction. In the small run (40 steps) the
#   loss first falls, then turns back up: the assert checks the turn.
# - Pure fp16 fails harder. AdamW divides by the square root of the running mean of squared gradients; in
#   fp16 a squared gradient of 2^-25 ≈ 3e-8 or less is zero, so is AdamW's `eps` (1e-8), and 0/0 is NaN.
#   Keeping fp32 "master" weights and optimizer state is the other half of mixed-precision training.
# - GradScaler multiplies the loss by 2^16 (doubling the scale after 2000 steps without an overflow, halving
#   it and skipping the step on one), which lifts the gradients into fp16's range; the result matches fp32.
# - bf16 needs none of this, at the price of 8x coarser rounding. This is why bf16 is the default on every
#   GPU that has it (A100 and newer), and fp16 with a scaler is the fallback (T4, V100).
#
# ## 3. Speed and memory of each precision
#
# A transformer block (`common.models.transformer.TransformerBlock`: attention plus MLP, pre-norm) trained
# for one step (forward, backward, AdamW) is dominated by six matmuls, so its speed follows the tensor-core
# rate of the precision. We time one step in each precision and count TFLOP/s from the matmul FLOPs
# (`block_flops`).

# %%
if DEVICE == "cuda":
    D_MODEL, HEADS, SEQ_LEN, BATCH_SIZE = (1024, 8, 1024, 4) if SMALL else (2048, 16, 2048, 4)
else:
    D_MODEL, HEADS, SEQ_LEN, BATCH_SIZE = 128, 4, 64, 4
STEP_FLOPS = block_flops(BATCH_SIZE, SEQ_LEN, D_MODEL)
block_input = torch.randn(BATCH_SIZE, SEQ_LEN, D_MODEL, device=DEVICE)
block_target = torch.randn_like(block_input)


def block_step_fn(policy_name):
    """A no-argument training step of a fresh block under a precision policy, for bench()."""
    torch.manual_seed(0)
    block = TransformerBlock(D_MODEL, HEADS).to(DEVICE)
    policy = amp.precision(policy_name)
    optimizer = torch.optim.AdamW(block.parameters(), lr=1e-4)
    scaler = policy.grad_scaler(DEVICE)
    return partial(
        amp.train_step,
        block,
        block_input,
        block_target,
        F.mse_loss,
        optimizer,
        policy,
        scaler=scaler if scaler.is_enabled() else None,
    )


# TF32 is the only difference between "fp32" and "tf32"; on a CPU there are no tensor cores, so no TF32.
# amp.train_step applies a policy's TF32 setting to the whole step: forward, backward and optimizer step.
policies = ["fp32", "tf32", "bf16", "fp16"] if DEVICE == "cuda" else ["fp32", "bf16", "fp16"]
peak_key = {"fp32": "fp32", "tf32": "tf32", "bf16": "bf16", "fp16": "fp16"}
steps = {}
for name in policies:
    steps[name] = bench(block_step_fn(name), name=name, flops=STEP_FLOPS, dtype=peak_key[name])
    if DEVICE == "cuda":
        torch.cuda.empty_cache()

rows = []
for name, r in steps.items():
    frac = f"{r.frac_peak_flops:.0%}" if r.frac_peak_flops is not None else "-"
    memory = f"{r.peak_memory_bytes / GiB:.2f}" if r.peak_memory_bytes is not None else "-"
    speedup = steps["fp32"].median_ms / r.median_ms
    rows.append((name, f"{r.median_ms:.2f}", f"{speedup:.2f}x", f"{r.tflops:.3g}", frac, memory))
show_table(["precision", "ms/step", "vs fp32", "TFLOP/s", "of peak", "peak GiB"], rows)

fig, axes = plt.subplots(
    1, 2 if DEVICE == "cuda" else 1, figsize=(10 if DEVICE == "cuda" else 5, 3.5), squeeze=False
)
axes[0, 0].bar(list(steps), [r.median_ms for r in steps.values()], color="C0")
axes[0, 0].set_ylabel("ms per training step")
axes[0, 0].set_title(f"Block d={D_MODEL}, seq {SEQ_LEN}, batch {BATCH_SIZE}: time")
if DEVICE == "cuda":
    axes[0, 1].bar(list(steps), [r.peak_memory_bytes / GiB for r in steps.values()], color="C1")
    axes[0, 1].set_ylabel("peak memory of the step (GiB)")
    axes[0, 1].set_title("memory")
plt.tight_layout()
plt.show()

if DEVICE == "cuda":
    bf16_speedup = steps["fp32"].median_ms / steps["bf16"].median_ms
    assert bf16_speedup > 2, (
        f"bf16 tensor cores: a matmul-bound step should be >2x fp32, got {bf16_speedup:.2f}x"
    )
    assert steps["tf32"].median_ms < steps["fp32"].median_ms, "TF32 is faster than fp32 CUDA cores"
    assert steps["bf16"].peak_memory_bytes < steps["fp32"].peak_memory_bytes, (
        "bf16 activations take half the bytes"
    )
    RESULTS["block step"] = (
        f"transformer block step: bf16 {bf16_speedup:.1f}x, tf32 "
        f"{steps['fp32'].median_ms / steps['tf32'].median_ms:.1f}x faster than fp32; peak memory "
        f"{steps['bf16'].peak_memory_bytes / GiB:.1f} vs {steps['fp32'].peak_memory_bytes / GiB:.1f} GiB"
    )
else:
    print("CPU: no tensor cores, so low precision buys little speed here (and no assertion on timings).")

# %% [markdown]
# With autocast the weights stay in fp32 and are cast to bf16 on the fly, and AdamW's state stays fp32, so
# memory drops less than 2x: what shrinks is the activations saved for the backward pass (by less than half:
# part 5 counts them).
#
# TF32 against fp32: the datasheet of an H100 or H200 SXM puts TF32 tensor cores at 494.7 dense TFLOP/s and
# fp32 on CUDA cores at 66.9, a 7.4x ratio of peaks. That is a fact about the hardware, not a measurement of
# this step: the table's "vs fp32" column is the measured end-to-end speedup of a whole step, which also
# spends time in attention, normalisation, elementwise ops and AdamW, none of which TF32 speeds up.
#
# ### Tensor cores want aligned shapes
#
# Tensor-core kernels move tiles of the matrices with 16-byte vector loads, so they want every dimension a
# multiple of 8 elements in bf16 (16 bytes). A bf16 row of 8191 columns is 16382 bytes, 2 short of a multiple
# of 16, so row r starts at byte 16382 r = 16384 r - 2r, a multiple of 16 only when r is a multiple of 8:
# 7 rows of every 8 are misaligned. cuBLAS falls back to slower kernels, though 8191^3 is 0.04% less work.
# (For the same reason GPT-2's vocabulary of 50257 tokens makes a slow output layer, and nanoGPT pads it to
# 50304, a multiple of 64.)

# %%
if DEVICE == "cuda":
    n = 4096 if SMALL else 8192
    alignment = {}
    for size in (n, n - 1):
        a = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(size, size, device=DEVICE, dtype=torch.bfloat16)
        alignment[size] = bench(
            partial(torch.matmul, a, b), name=f"bf16 {size}^3", flops=2 * size**3, dtype="bf16"
        )
    del a, b
    show_table(
        ["n", "ms", "TFLOP/s"], [(s, f"{r.median_ms:.3f}", f"{r.tflops:.0f}") for s, r in alignment.items()]
    )
    slowdown = alignment[n].tflops / alignment[n - 1].tflops
    print(f"{n - 1} is {slowdown:.2f}x slower per FLOP than {n}")
    assert slowdown > 1, "the aligned shape gets more FLOP/s"
else:
    print("Skipped on CPU: shape alignment is about GPU tensor cores.")

# %% [markdown]
# ### fp8 matmuls on Hopper
#
# GPUs with compute capability 8.9 and newer (L4, RTX 4090, H100) have fp8 tensor cores at twice the bf16
# rate. fp8's 3 mantissa bits (e4m3) and tiny range mean every tensor carries a **scale**: `common.amp.to_fp8`
# maps a tensor's largest magnitude onto fp8's max (448) and keeps the scale in fp32; `torch._scaled_mm`
# multiplies fp8 matrices and applies both scales to the result. The fp8 tensor cores accumulate in a
# format of limited precision; by default cuBLAS periodically promotes the partial sums into fp32 registers.
# `use_fast_accum=True` skips that promotion: less accurate, and meant to be faster (training recipes use it
# for forward passes only). Whether it is faster depends on the shape and the cuBLAS version: the table
# shows what it bought on this GPU, and the speedup below is that of fp8 with the default accumulation.

# %%
if DEVICE == "cuda" and amp.fp8_supported():
    n = 4096 if SMALL else 8192
    a = torch.randn(n, n, device=DEVICE)
    b = torch.randn(n, n, device=DEVICE)
    reference = a.double() @ b.double()
    a16, b16 = a.bfloat16(), b.bfloat16()
    (a8, scale_a), (b8, scale_b) = amp.to_fp8(a), amp.to_fp8(b)
    b8 = b8.t().contiguous().t()  # column-major, as cuBLAS's fp8 GEMM requires
    candidates = {
        "bf16": (partial(torch.matmul, a16, b16), "bf16"),
        "fp8 e4m3": (partial(amp.scaled_mm, a8, b8, scale_a, scale_b), "fp8"),
        "fp8 e4m3, fast accum": (
            partial(amp.scaled_mm, a8, b8, scale_a, scale_b, use_fast_accum=True),
            "fp8",
        ),
    }
    rows, fp8_results = [], {}
    for name, (fn, key) in candidates.items():
        r = bench(fn, name=name, flops=2 * n**3, dtype=key)
        error = ((fn().double() - reference).norm() / reference.norm()).item()
        fp8_results[name] = (r, error)
        frac = f"{r.frac_peak_flops:.0%}" if r.frac_peak_flops is not None else "-"
        rows.append((name, f"{r.median_ms:.3f}", f"{r.tflops:.0f}", frac, f"{error:.1e}"))
    show_table(["GEMM", "ms", "TFLOP/s", "of peak", "rel. error"], rows)
    del a, b, reference, a16, b16, a8, b8, candidates
    fp8_speedup = fp8_results["bf16"][0].median_ms / fp8_results["fp8 e4m3"][0].median_ms
    assert fp8_speedup > 1.2, f"fp8 tensor cores beat bf16: {fp8_speedup:.2f}x"
    assert fp8_results["fp8 e4m3"][1] > 4 * fp8_results["bf16"][1], "at the price of ~10x the rounding error"
    RESULTS["fp8"] = (
        f"fp8 GEMM {n}^3: {fp8_results['fp8 e4m3'][0].tflops:.0f} TFLOP/s, {fp8_speedup:.2f}x bf16, "
        f"error {fp8_results['fp8 e4m3'][1]:.0e} vs {fp8_results['bf16'][1]:.0e}"
    )
else:
    try:
        amp.fp8_matmul(torch.randn(64, 64, device=DEVICE), torch.randn(64, 64, device=DEVICE))
    except amp.Fp8UnsupportedError as error:
        print(f"Skipped: {error}")
    # Without fp8 hardware we can still see what fp8 rounding does to a matmul:
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    (a8, scale_a), (b8, scale_b) = amp.to_fp8(a), amp.to_fp8(b)
    reference = a.double() @ b.double()
    simulated = (a8.double() * scale_a.double()) @ (b8.double() * scale_b.double())
    error = ((simulated - reference).norm() / reference.norm()).item()
    bf16_error = (
        (a.bfloat16().double() @ b.bfloat16().double() - reference).norm() / reference.norm()
    ).item()
    print(
        f"fp8 e4m3 operands (per-tensor scales): relative error {error:.1e}; bf16 operands: {bf16_error:.1e}"
    )
    assert error > 4 * bf16_error

# %% [markdown]
# ### Compiling the step: `torch.compile`
#
# In eager mode every op is a kernel of its own: LayerNorm reads and writes the whole activation, GELU reads
# and writes it again, autocast adds casts in between. `torch.compile` captures the block's forward (and,
# through AOTAutograd, its backward) as a graph, and its default backend, Inductor, generates Triton kernels
# that fuse the normalisations and elementwise ops; the matmuls and attention stay library calls. The first
# call compiles, which takes seconds to minutes; later calls reuse the code until a shape or a dtype changes.
#
# We compile the block of the table above and time the same bf16 training step, eager against compiled, with
# the optimizer step left eager. The assert checks that the compiled step computes the same loss and is
# faster; the printed ratio says by how much. On a CPU the cell is skipped: Inductor's C++ code generation
# takes more than a minute for a small block on a two-core CPU, which this notebook's CPU run can't afford.

# %%
if DEVICE == "cuda":

    def block_step_and_block(compiled):
        """A bf16 training step of a fresh block (same seed, same weights), eager or compiled; and the block."""
        torch.manual_seed(0)
        block = TransformerBlock(D_MODEL, HEADS).to(DEVICE)
        optimizer = torch.optim.AdamW(block.parameters(), lr=1e-4)
        model = torch.compile(block) if compiled else block
        step = partial(amp.train_step, model, block_input, block_target, F.mse_loss, optimizer, "bf16")
        return step, block

    eager_step, _ = block_step_and_block(compiled=False)
    compiled_step, _ = block_step_and_block(compiled=True)
    start = time.perf_counter()
    compiled_loss = compiled_step()  # the first call compiles the forward and the backward
    compile_s = time.perf_counter() - start
    eager_loss = eager_step()
    print(f"first call of the compiled step: {compile_s:.1f} s, most of it compiling")
    print(f"loss of the first step: {compiled_loss:.5f} compiled, {eager_loss:.5f} eager")
    # The same weights and data: the same loss, up to bf16 rounding (fused kernels round intermediates less).
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=2e-2, atol=0)
    compile_fix = compare(
        eager_step, compiled_step, names=("eager", "torch.compile"), flops=STEP_FLOPS, dtype="bf16"
    )
    print(compile_fix)
    show_table(
        ["block step, bf16", "ms/step", "TFLOP/s", "peak GiB"],
        [
            (
                r.name,
                f"{r.median_ms:.2f}",
                f"{r.tflops:.3g}",
                f"{r.peak_memory_bytes / GiB:.2f}" if r.peak_memory_bytes is not None else "-",
            )
            for r in (compile_fix.baseline, compile_fix.candidate)
        ],
    )
    assert compile_fix.speedup > 1, f"the compiled step is faster than eager: {compile_fix.speedup:.2f}x"
    RESULTS["block step"] += f"; torch.compile {compile_fix.speedup:.2f}x faster than eager (bf16)"
    del eager_step, compiled_step
    torch.cuda.empty_cache()
else:
    print("Skipped on CPU: compiling the block takes over a minute on a small CPU; the GPU run times it.")

# %% [markdown]
# ## 4. The input pipeline
#
# A GPU step of a few milliseconds needs its next batch ready when it ends. Preparing a batch of images on
# the CPU means reading files, decoding JPEGs, cropping, flipping and normalising: tens of milliseconds per
# batch on one core. `DataLoader(num_workers=k)` runs k worker processes that prepare batches in parallel,
# ahead of the training loop.
#
# We write photo-like JPEGs with `common.data.write_jpegs` and read them through `common.data.JpegDataset`
# with a standard augmentation (random resized crop, flip, normalise; torchvision's v2 transforms, which are
# picklable, so workers also work where processes are spawned rather than forked, as on macOS and Windows).

# %%
N_IMAGES, IMAGE_SIZE, CROP = (64, (128, 128), 96) if SMALL else (256, (384, 512), 224)
start = time.perf_counter()
jpeg_paths = data.write_jpegs(WORK / "train", N_IMAGES, size=IMAGE_SIZE)
print(
    f"wrote {N_IMAGES} JPEGs of {IMAGE_SIZE[0]}x{IMAGE_SIZE[1]} in {time.perf_counter() - start:.1f} s, "
    f"{sum(p.stat().st_size for p in jpeg_paths) / N_IMAGES / 1e3:.0f} kB each"
)
augment = v2.Compose(
    [
        v2.RandomResizedCrop(CROP, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225]),
    ]
)
jpeg_dataset = data.JpegDataset(jpeg_paths, decoder="pil", transform=augment)


def epoch(loader):
    for _images, _labels in loader:
        pass


cores = os.cpu_count() or 1
worker_counts = (
    sorted({0, 1, min(2, cores), min(4, cores), min(8, cores)}) if not SMALL else [0, min(2, cores)]
)
loader_times = {}
for workers in worker_counts:
    loader = DataLoader(
        jpeg_dataset, batch_size=32, num_workers=workers, persistent_workers=workers > 0, shuffle=True
    )
    # The first (warm-up) epoch pays for starting the workers; persistent workers live on for the next ones.
    loader_times[workers] = time_slow(partial(epoch, loader), f"{workers} workers")
    del loader
base = loader_times[0].min_ms
show_table(
    ["workers", "best ms/epoch", "images/s", "speedup"],
    [
        (w, f"{r.min_ms:.0f}", f"{N_IMAGES / r.min_ms * 1e3:.0f}", f"{base / r.min_ms:.1f}x")
        for w, r in loader_times.items()
    ],
)
best = min(loader_times, key=lambda w: loader_times[w].min_ms)
if cores >= 8 and not SMALL:
    assert base / loader_times[4].min_ms > 1.5, "4 workers decode in parallel"
RESULTS["workers"] = (
    f"JPEG loader: {N_IMAGES / base * 1e3:.0f} images/s with 0 workers, "
    f"{N_IMAGES / loader_times[best].min_ms * 1e3:.0f} with {best} ({cores} cores)"
)

# %% [markdown]
# Workers help as long as there are free cores (and the main process, which drives the GPU, keeps one).
# On a laptop with two cores the gain is small; on a GPU server with 16+ cores per GPU, 4-8 workers per
# GPU are typical.
#
# ### Pinned memory
#
# A host-to-device copy from ordinary (pageable) memory goes through a pinned staging buffer, one chunk at a
# time, and blocks the host; from pinned (page-locked) memory the GPU's copy engine reads directly and the copy
# can be asynchronous (`non_blocking=True`). `DataLoader(pin_memory=True)` makes the workers' batches
# pinned.

# %%
if DEVICE == "cuda":
    batch_shape = (256, 3, CROP, CROP)
    pageable = torch.randn(batch_shape)
    pinned = torch.randn(batch_shape).pin_memory()
    nbytes = pageable.numel() * pageable.element_size()
    copies = {
        "pageable": bench(lambda: pageable.to(DEVICE), name="pageable", bytes=nbytes, cache="warm"),
        "pinned": bench(
            lambda: pinned.to(DEVICE, non_blocking=True), name="pinned", bytes=nbytes, cache="warm"
        ),
    }
    show_table(
        ["host memory", "ms", "GB/s"], [(k, f"{r.median_ms:.2f}", f"{r.gbps:.1f}") for k, r in copies.items()]
    )
    assert copies["pinned"].gbps > copies["pageable"].gbps, "pinned memory copies faster"
    del pageable, pinned
else:
    print("Skipped on CPU: pinned memory is about copies to a GPU.")

# %% [markdown]
# ### Decoding JPEGs: Pillow, libjpeg-turbo, nvJPEG
#
# Decoding is most of the CPU's work in an image pipeline. Three ways to turn JPEG bytes into an image tensor:
#
# - **Pillow** (`PIL.Image.open(...).convert("RGB")`), what most pipelines do;
# - **`torchvision.io.decode_jpeg`** on the CPU: libjpeg-turbo straight into a tensor, no PIL image in between;
# - **`torchvision.io.decode_jpeg(list_of_tensors, device="cuda")`**: nvJPEG decodes the whole batch on the
#   GPU, and the images are already where the model needs them.
#
# The files are read into memory first, so we time decoding, not the disk.

# %%
N_DECODE, DECODE_SIZE = (32, (256, 256)) if SMALL else (128, (768, 1024))
decode_paths = data.write_jpegs(WORK / "decode", N_DECODE, size=DECODE_SIZE, seed=1)
encoded = [torchvision.io.read_file(str(p)) for p in decode_paths]
megapixels = N_DECODE * DECODE_SIZE[0] * DECODE_SIZE[1] / 1e6
decoders = {
    "Pillow": lambda: [data.decode_jpeg_pil(e) for e in encoded],
    "torchvision, CPU": lambda: [
        torchvision.io.decode_jpeg(e, mode=torchvision.io.ImageReadMode.RGB) for e in encoded
    ],
}
decode_times = {name: time_slow(fn, name) for name, fn in decoders.items()}
cpu_images = decoders["torchvision, CPU"]()
if DEVICE == "cuda":

    def gpu_decode():
        images = torchvision.io.decode_jpeg(encoded, mode=torchvision.io.ImageReadMode.RGB, device=DEVICE)
        torch.cuda.synchronize()  # timed until the images are ready, whichever stream nvJPEG used
        return images

    # Timed with CUDA events (common.bench's timer on a GPU); the sync inside makes the end event follow the
    # decode, whichever stream nvJPEG used.
    decode_times["nvJPEG, GPU batch"] = bench(
        gpu_decode, name="nvJPEG, GPU batch", warmup_ms=100, min_reps=10
    )
    gpu_images = gpu_decode()
    diff = torch.stack(
        [(g.cpu().int() - c.int()).abs().float().mean() for g, c in zip(gpu_images, cpu_images, strict=True)]
    )
    print(f"GPU vs CPU decode: mean absolute difference {diff.mean():.2f} levels of 255")
    # The files store colour at half resolution (4:2:0, like most JPEGs): nvJPEG upsamples it nearest-neighbour,
    # libjpeg-turbo interpolates, so pixels at colour edges differ by a few levels (a wrong decode: by dozens).
    assert diff.max() < 3, "nvJPEG and libjpeg-turbo agree up to rounding and colour upsampling"
    del gpu_images
pil_images = decoders["Pillow"]()
cpu_diff = max(
    (p.int() - c.int()).abs().float().mean().item() for p, c in zip(pil_images, cpu_images, strict=True)
)
print(
    f"Pillow vs torchvision on the CPU: mean absolute difference up to {cpu_diff:.2f} levels (both use libjpeg-turbo)"
)
assert cpu_diff < 1, "the two CPU decoders agree up to rounding"

show_table(
    ["decoder", "best ms/batch", "images/s", "MPix/s", "vs Pillow"],
    [
        (
            name,
            f"{r.min_ms:.1f}",
            f"{N_DECODE / r.min_ms * 1e3:.0f}",
            f"{megapixels / r.min_ms * 1e3:.0f}",
            f"{decode_times['Pillow'].min_ms / r.min_ms:.1f}x",
        )
        for name, r in decode_times.items()
    ],
)
if DEVICE == "cuda":
    gpu_speedup = decode_times["Pillow"].min_ms / decode_times["nvJPEG, GPU batch"].min_ms
    assert gpu_speedup > 1, f"the GPU decodes a batch faster than one CPU core: {gpu_speedup:.1f}x"
    RESULTS["jpeg"] = (
        f"decode {N_DECODE} JPEGs {DECODE_SIZE[0]}x{DECODE_SIZE[1]}: Pillow "
        f"{N_DECODE / decode_times['Pillow'].min_ms * 1e3:.0f} img/s, GPU batch {gpu_speedup:.0f}x faster"
    )

# %% [markdown]
# One CPU core decodes the Pillow and torchvision rows' images per second; on a GPU, one batched nvJPEG call
# decodes more (the assert checks that it is faster; the "vs Pillow" column says by how much), and leaves the
# CPU cores free for everything else. (DALI and torchvision's GPU transforms then augment on the GPU too.)
#
# ### Padding: the cost of variable-length sequences
#
# Text comes in documents of very different lengths; a batch is a rectangle. Padding every sequence to the
# model's maximum length is simplest and wastes most of the compute. **Dynamic padding**
# (`common.data.pad_collate`) pads each batch only to its own longest sequence. With lengths from a
# long-tailed distribution (as real documents have), a batch of random sequences still usually contains one
# long one, so some waste remains; sorting by length and packing several sequences into one row remove most of
# it (that is this week's assignment).

# %%
if DEVICE == "cpu":
    N_SEQ, MEDIAN_LEN, MAX_LEN, SEQ_VOCAB, SEQ_WIDTH, SEQ_HEADS = 64, 48, 256, 256, 32, 2
else:
    N_SEQ, MEDIAN_LEN, MAX_LEN, SEQ_VOCAB, SEQ_WIDTH, SEQ_HEADS = (
        (256, 128, 1024, 1024, 256, 4) if SMALL else (2048, 256, 2048, 1024, 1024, 8)
    )
SEQ_BATCH = 16
corpus = data.SyntheticTokens(
    N_SEQ, vocab_size=SEQ_VOCAB, median_length=MEDIAN_LEN, sigma=1.0, max_length=MAX_LEN, seed=3
)
lengths = corpus.lengths
order = np.random.default_rng(0).permutation(N_SEQ)
batches = [order[i : i + SEQ_BATCH] for i in range(0, N_SEQ, SEQ_BATCH)]
real = int(lengths.sum())
dynamic = sum(len(b) * int(lengths[b].max()) for b in batches)
padded = len(batches) * SEQ_BATCH * MAX_LEN
assert real < dynamic < padded
print(
    f"lengths: median {np.median(lengths):.0f}, mean {lengths.mean():.0f}, p99 {np.percentile(lengths, 99):.0f}, max {lengths.max()}"
)
show_table(
    ["strategy", "tokens computed", "of which padding"],
    [
        ("no padding (ideal)", real, "0%"),
        ("dynamic padding", dynamic, f"{1 - real / dynamic:.0%}"),
        (f"pad to {MAX_LEN}", padded, f"{1 - real / padded:.0%}"),
    ],
)

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
# The corpus is a sample of this distribution; 20,000 draws of it (lengths only, no tokens) show its shape.
axes[0].hist(
    data.sample_lengths(20_000, median=MEDIAN_LEN, sigma=1.0, max_length=MAX_LEN), bins=64, color="C0"
)
axes[0].set_xlabel("sequence length (tokens)")
axes[0].set_ylabel("sequences (of 20,000)")
axes[0].set_title(f"Log-normal lengths, clipped at {MAX_LEN}: most short, a long tail")
axes[1].bar(["ideal", "dynamic", f"pad to {MAX_LEN}"], [real, dynamic, padded], color=["C2", "C0", "C3"])
axes[1].set_ylabel("tokens computed per epoch")
axes[1].set_title("Compute spent, including padding")
plt.tight_layout()
plt.show()

# %% [markdown]
# Now the time of an epoch. The model is an embedding, one causal `TransformerBlock` and a head. Padding goes
# on the right and attention is causal, so a real token never attends to a pad; the pads' targets are set to
# `-100`, which `cross_entropy` ignores. The result is the same training signal either way; only the time
# differs, and by more than the token count where attention matters: its cost grows with the square of the
# padded length.

# %%
torch.manual_seed(0)
seq_model = nn.Sequential(
    nn.Embedding(SEQ_VOCAB, SEQ_WIDTH),
    TransformerBlock(SEQ_WIDTH, SEQ_HEADS),
    nn.Linear(SEQ_WIDTH, SEQ_VOCAB),
).to(DEVICE)
seq_optimizer = torch.optim.AdamW(seq_model.parameters(), lr=1e-3)
seq_policy = amp.precision("bf16" if DEVICE == "cuda" else "fp32")


def masked_lm_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)


def make_batches(pad_to):
    out = []
    for b in batches:
        batch = data.pad_collate([corpus[i] for i in b], pad_to=pad_to)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        out.append((ids[:, :-1].to(DEVICE), targets.to(DEVICE)))
    return out


def train_epoch(prepared):
    for inputs, targets in prepared:
        loss = amp.train_step(seq_model, inputs, targets, masked_lm_loss, seq_optimizer, seq_policy)
    return loss.item()  # note: one host-device sync per epoch, so the timing includes all the GPU work


prepared = {"dynamic padding": make_batches(None), f"pad to {MAX_LEN}": make_batches(MAX_LEN)}
epoch_times = {
    name: time_slow(partial(train_epoch, p), name, reps=2 if SMALL else 3) for name, p in prepared.items()
}
show_table(
    ["strategy", "best s/epoch", "real tokens/s"],
    [(name, f"{r.min_ms / 1e3:.2f}", f"{real / r.min_ms * 1e3:.3g}") for name, r in epoch_times.items()],
)
padding_speedup = epoch_times[f"pad to {MAX_LEN}"].min_ms / epoch_times["dynamic padding"].min_ms
print(f"dynamic padding: {padding_speedup:.1f}x faster per epoch, {padded / dynamic:.1f}x fewer tokens")
if (
    DEVICE == "cuda"
):  # wide enough that matmuls, not kernel launches, set the time: tokens saved show as time saved
    assert padding_speedup > 1 + 0.5 * (padded / dynamic - 1), "fewer tokens, less time"
RESULTS["padding"] = (
    f"pad-to-{MAX_LEN} wastes {1 - real / padded:.0%} of tokens, dynamic padding {1 - real / dynamic:.0%}; "
    f"epoch {padding_speedup:.1f}x faster"
)
del prepared

# %% [markdown]
# ## 5. Profiling: find the bottleneck, then fix it
#
# `torch.profiler` records every PyTorch op (and, on a GPU, every kernel) with its time. Two numbers per op:
# **self time** (spent in the op itself) and **total time** (including the ops it called). Our wrapper
# `common.profiling.profile_steps` skips a step, warms up for one, records three, and writes a Chrome trace
# that <https://ui.perfetto.dev> shows as a timeline. `record_function("name")` labels a region of our own
# code, so it shows up as a row of the table and a bar of the timeline.
#
# The training step below classifies `common.data.SyntheticImages` with a small CNN. Someone wrote the
# augmentation per image, in a Python loop: that is the planted bottleneck. (On a machine without a GPU,
# PyTorch's CUDA build prints a harmless `gpuGetDeviceCount failed` line when the profiler starts.)

# %%
IMG, IMG_BATCH, CHANNELS = (32, 32, (16, 32)) if DEVICE == "cpu" else (64, 256, (64, 128))
images_ds = data.SyntheticImages(IMG_BATCH * 4, size=IMG, num_classes=10)
image_batches = [
    tuple(
        torch.stack(t).to(DEVICE)
        for t in zip(*[images_ds[i] for i in range(k * IMG_BATCH, (k + 1) * IMG_BATCH)], strict=True)
    )
    for k in range(4)
]
BLUR = torch.tensor([1.0, 2.0, 1.0], device=DEVICE)
BLUR = (BLUR[:, None] * BLUR[None, :] / 16).expand(3, 1, 3, 3).contiguous()  # a 3x3 blur per channel


def augment_per_image(images):
    """The slow version: flip, jitter brightness and blur one image at a time."""
    out = []
    for image in images:
        if torch.rand(()) < 0.5:
            image = image.flip(-1)
        image = image * (0.8 + 0.4 * torch.rand((), device=images.device))
        image = F.conv2d(image[None], BLUR, padding=1, groups=3)[0]
        out.append(image)
    return torch.stack(out)


def augment_batched(images):
    """The same augmentation for the whole batch at once: a handful of ops, whatever the batch size."""
    flip = torch.rand(len(images), 1, 1, 1, device=images.device) < 0.5
    images = torch.where(flip, images.flip(-1), images)
    images = images * (0.8 + 0.4 * torch.rand(len(images), 1, 1, 1, device=images.device))
    return F.conv2d(images, BLUR, padding=1, groups=3)


def make_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, CHANNELS[0], 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(CHANNELS[0], CHANNELS[1], 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(CHANNELS[1], 10),
    ).to(DEVICE)


def cnn_step_fn(augment_fn):
    model, it = make_cnn(), iter(range(10**9))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def step():
        images, labels = image_batches[next(it) % len(image_batches)]
        with record_function("augment"):
            images = augment_fn(images)
        with record_function("model"):
            return amp.train_step(model, images, labels, F.cross_entropy, optimizer, "fp32")

    return step


def profile_and_count(step, trace_name):
    """Profile 3 steps of `step`; print the top ops; return {(name, device): OpStat} and the trace's events."""
    prof = profiling.profile_steps(step, trace_path=WORK / trace_name)
    print(profiling.top_ops_table(prof, k=8))
    events = json.loads((WORK / trace_name).read_text())["traceEvents"]
    return profiling.op_stats(prof), events


slow_step, fast_step = cnn_step_fn(augment_per_image), cnn_step_fn(augment_batched)
slow_ops, slow_events = profile_and_count(slow_step, "slow_step.json")


def share(ops, label):
    """CPU time inside a record_function label, per recorded step, and its share of augment + model."""
    cpu_ms = {name: ops[(name, "cpu")].cpu_total_ms for name in ("augment", "model")}  # the host-side rows
    return cpu_ms[label] / 3, cpu_ms[label] / sum(cpu_ms.values())


augment_ms, augment_share = share(slow_ops, "augment")
print(f"\naugment: {augment_ms:.1f} ms of CPU time per step, {augment_share:.0%} of the step's CPU time")
conv_calls = slow_ops[("aten::conv2d", "cpu")].calls
print(f"aten::conv2d calls in 3 steps: {conv_calls} (the model's 2 per step + one blur per image)\n")
assert conv_calls == 3 * (2 + IMG_BATCH)
augment_ranges = [e for e in slow_events if e.get("name") == "augment" and e.get("cat") == "user_annotation"]
assert len(augment_ranges) == 3, "the trace has one augment range per recorded step"

# A label's two rows: on the host (its CPU time; the kernels launched inside it as its device total) and,
# with a GPU, on the GPU (the span from its first kernel's start to its last kernel's end).
label_rows = []
for label in ("augment", "model"):
    host, gpu = slow_ops[(label, "cpu")], slow_ops.get((label, DEVICE)) if DEVICE != "cpu" else None
    kernels = f"{host.device_total_ms / 3:.2f}" if gpu is not None else "-"
    span = f"{gpu.device_total_ms / 3:.2f}" if gpu is not None else "-"
    label_rows.append((label, f"{host.cpu_total_ms / 3:.2f}", kernels, span))
show_table(["label", "CPU ms/step", "GPU kernels ms/step", "GPU span ms/step"], label_rows)
if DEVICE == "cuda":
    augment_kernels = slow_ops[("augment", "cpu")].device_total_ms
    augment_span = slow_ops[("augment", "cuda")].device_total_ms
    assert augment_span >= 0.99 * augment_kernels, (
        "a span on one stream holds its kernels back to back at best"
    )
    assert augment_kernels < 0.5 * augment_span, (
        f"the GPU idles most of the augment range: kernels {augment_kernels:.1f} of {augment_span:.1f} ms"
    )

# %% [markdown]
# The table is sorted by self time (GPU time where there is a GPU, else CPU time). The labels tell the story
# the op names hide: the `augment` range takes most of the step, and inside it the per-image ops run once per
# image (`aten::conv2d` is called 2 + batch-size times a step). Each call costs microseconds of Python and
# dispatch (and on a GPU a kernel launch) for very little work.
#
# On a GPU one label has two rows in the profiler's table, and they measure different things. The row with
# no CPU time is the label's copy on the GPU's timeline: its CUDA time is the span from the start of the
# first kernel launched inside the label to the end of the last one, idle gaps included. For `augment` that
# span is mostly gaps (the GPU waits for the CPU to launch the next tiny per-image kernel), and its "Self
# CUDA %" can exceed 100%: the percentage is of the total kernel time, which the span is not. The GPU work of
# a label is the CUDA total of its other, host-side row: the kernels launched by everything inside it. The
# small table above puts the two side by side (`common.profiling.op_stats` keys rows by name and device, so
# neither is lost), and the assert checks that the GPU idles for most of the augment range.
#
# The fix is to augment the whole batch with the same few ops, whatever the batch size:

# %%
fast_ops, _ = profile_and_count(fast_step, "fast_step.json")
assert fast_ops[("aten::conv2d", "cpu")].calls == 3 * 3, "two model convolutions and one blur per step"
fix = compare(
    slow_step,
    fast_step,
    names=("per-image augment", "batched augment"),
    warmup_ms=10,
    rep_ms=200 if SMALL else 500,
)
print(fix)
augment_fast_ms, _ = share(fast_ops, "augment")
print(f"augment CPU time per step: {augment_ms:.1f} ms -> {augment_fast_ms:.2f} ms")
if DEVICE == "cuda":
    assert fix.speedup > 1.5, f"the batched augmentation removes most of the step: {fix.speedup:.2f}x"
RESULTS["profiling"] = (
    f"per-image augmentation: {augment_share:.0%} of the step's CPU time; batched: step {fix.speedup:.1f}x faster"
)
print(
    f"traces for https://ui.perfetto.dev: {(WORK / 'slow_step.json').relative_to(REPO_ROOT)}, "
    f"{(WORK / 'fast_step.json').relative_to(REPO_ROOT)}"
)

# %% [markdown]
# ### A host-device sync in the loop
#
# `loss.item()` copies a number to the host, so the CPU waits until the GPU has finished everything queued
# so far. Without syncs the CPU runs ahead: while the GPU computes step i, the CPU does the host side of step
# i+1 (reading and collating a batch, logging) and queues its kernels. A sync every step takes that overlap
# away: the GPU idles while the CPU does its part, then the CPU idles while the GPU does its part, and a step
# costs the sum of the two instead of the larger.
#
# The demo: the bf16 training step of the part-3 block, plus host work that takes as long as the GPU's step
# (a busy loop, standing for data loading and logging in the main process: the case where the overlap is
# worth most, up to 2x), 20 steps, with `.item()` every step against losses kept on the GPU and read once at
# the end. What the CPU waits for in the sync is the part of the GPU's step that the CPU's own launching of
# the step's kernels did not cover. With the part-3 batch, launching a step's kernels (slowed further by the
# profiler) takes a large part of the time the GPU needs to run them, which would leave little to wait for.
# So at full size the demo runs four times that batch: the same kernels, each doing four times the work, so a
# GPU step several times longer than its launches. The asserts check that the CPU then waits for more than
# half of the GPU's step in the sync, and that removing the sync makes the loop more than 1.3x faster.
#
# Where does the profiler show the wait? `aten::item` calls `aten::_local_scalar_dense`, which queues a
# device-to-host copy (`cudaMemcpyAsync`) and waits for the stream in `cudaStreamSynchronize`: the waiting is
# that CUDA runtime call's *self CPU* time. `_local_scalar_dense` itself has almost none: its total includes
# the wait, its self time does not.

# %%
if DEVICE == "cuda":
    torch.manual_seed(0)
    sync_block = TransformerBlock(D_MODEL, HEADS).to(DEVICE)
    sync_optimizer = torch.optim.AdamW(sync_block.parameters(), lr=1e-4, fused=True)  # fused: few launches
    sync_input = block_input if SMALL else block_input.repeat(4, 1, 1)  # a GPU step longer than its launches
    sync_target = torch.randn_like(sync_input)
    gpu_step = partial(
        amp.train_step, sync_block, sync_input, sync_target, F.mse_loss, sync_optimizer, "bf16"
    )
    gpu_ms = bench(gpu_step, name="block step").median_ms  # the GPU's time for one step

    def host_work():
        """The host's part of a step (reading a batch, logging), played by a busy loop of gpu_ms."""
        end = time.perf_counter() + gpu_ms / 1e3
        while time.perf_counter() < end:
            pass

    def step_logging_every_step(log):
        host_work()
        log.append(gpu_step().item())  # note: a host-device sync every step

    def step_logging_on_device(log):
        host_work()
        log.append(gpu_step())  # stays on the GPU

    def twenty_steps(step):
        log = []
        for _ in range(20):
            step(log)
        return log if isinstance(log[0], float) else torch.stack(log).tolist()  # the latter: one sync

    item_ops = profiling.op_stats(profiling.profile_steps(partial(step_logging_every_step, [])))
    device_ops = profiling.op_stats(profiling.profile_steps(partial(step_logging_on_device, [])))
    chain = ["aten::item", "aten::_local_scalar_dense", "cudaMemcpyAsync", "cudaStreamSynchronize"]
    show_table(
        ["host-side row (3 steps)", "calls", "self CPU ms/step", "CPU total ms/step"],
        [
            (name, op.calls, f"{op.self_cpu_ms / 3:.3f}", f"{op.cpu_total_ms / 3:.3f}")
            for name in chain
            if (op := item_ops.get((name, "cpu"))) is not None
        ],
    )
    wait_ms = item_ops[("cudaStreamSynchronize", "cpu")].self_cpu_ms / 3
    scalar_ms = item_ops[("aten::_local_scalar_dense", "cpu")].self_cpu_ms / 3
    print(
        f"GPU time of a step: {gpu_ms:.2f} ms; per step the CPU waits {wait_ms:.2f} ms in cudaStreamSynchronize"
    )
    assert item_ops[("aten::item", "cpu")].calls == 3 and ("aten::item", "cpu") not in device_ops
    # At full size the GPU's step outlasts the CPU's launches (even with the profiler's overhead), so the CPU
    # reaches .item() while the GPU is still busy. The small GPU step can finish before the launches do.
    if not SMALL:
        assert wait_ms > 0.5 * gpu_ms, (
            f"the CPU waits for more than half of the GPU's step: {wait_ms:.2f} of {gpu_ms:.2f} ms"
        )
        assert wait_ms > 10 * scalar_ms, (
            "the wait is cudaStreamSynchronize's self time, not _local_scalar_dense's"
        )

    sync_fix = compare(
        partial(twenty_steps, step_logging_every_step),
        partial(twenty_steps, step_logging_on_device),
        names=(".item() every step", "losses kept on the GPU"),
        warmup_ms=100,
        rep_ms=1000,
    )
    print(sync_fix)
    # Ideal: (host + GPU) / max(host + launch, GPU) = 2x when host = GPU >> launch time (full size).
    if not SMALL:
        assert sync_fix.speedup > 1.3, (
            f"without a sync per step, host and GPU work overlap: {sync_fix.speedup:.2f}x"
        )
    RESULTS["profiling"] = RESULTS["profiling"] + f"; no .item() per step: {sync_fix.speedup:.2f}x faster"
    del sync_block, sync_optimizer, gpu_step, sync_input, sync_target
else:
    print("Skipped on CPU: CPU ops are synchronous, so .item() has nothing to wait for.")

# %% [markdown]
# The ratio depends on how the host's and the GPU's parts of a step compare. Here they are equal, the case
# where overlap matters most. When the GPU's part is much longer, a sync costs only the launch time of one
# step; when the host's part is much longer, the GPU idles either way and the fix is to make the host faster
# (DataLoader workers, part 4).
#
# ### Activation memory of a transformer block, by formula
#
# Between the forward and the backward pass, a training step keeps alive what autograd saves to compute
# gradients. Going through `TransformerBlock.forward` under bf16 autocast, per token, with d = d_model,
# h heads, the MLP 4d wide, and p bytes per element of a 16-bit activation (p = 2; without autocast
# everything is fp32 and p = 4):
#
# | saved by | what | bytes per token |
# | --- | --- | --- |
# | LayerNorm 1 and 2 | their inputs: the residual stream x and x + attention, fp32 | 2 × 4d |
# | LayerNorm 1 and 2 | a mean and a 1/std per token, fp32 | 2 × 8 |
# | qkv projection | its input, the normalised x cast to 16 bits | p d |
# | attention (SDPA) | q, k, v (views of the qkv output) and its output | p (3d + d) |
# | attention (SDPA) | the softmax's log-sum-exp, per head, fp32 | 4h |
# | output projection | its input: a view of the attention's output, already counted | 0 |
# | fc, GELU, fc_out | fc's input; fc's output = GELU's input; GELU's output | p (d + 4d + 4d) |
#
# Total, A = 8d + 14 p d + 4h + 16 bytes per token: 36d + 4h + 16 in bf16, 64d + 4h + 16 in fp32. The
# sequence length is missing: fused attention (FlashAttention and its kin) saves no seq x seq matrix, it
# recomputes the scores in the backward pass (unfused "math" attention would save at least h x seq more
# elements per token). And bf16 saves less than half of fp32's bytes, not half: the residual stream stays fp32.
# Autocast adds the 16-bit copies of the four weight matrices, 12 d² elements, which the backward needs too.
#
# The check, first on any device: a `saved_tensors_hooks` pack hook sees every tensor autograd saves; we
# add up the bytes of their storages (each once, parameters left out). Then on a GPU, the allocator: a
# forward pass allocates A per token, minus the block's input, which already exists, plus its output, 4d
# bytes per token, which is new: A x tokens again, plus the weights' 16-bit copies.


# %%
def activation_bytes_per_token(d_model, n_heads, act_bytes, mlp_ratio=4):
    """Bytes autograd saves per token in a TransformerBlock forward (fp32 residual stream, act_bytes the rest)."""
    residual = 2 * 4 * d_model  # the inputs of the two LayerNorms
    norm_stats = 2 * 2 * 4  # mean and 1/std of each LayerNorm
    # norm1's output, q k v, attention's output, norm2's output, fc's output, GELU's output
    low = (1 + 3 + 1 + 1 + 2 * mlp_ratio) * d_model * act_bytes
    return residual + norm_stats + low + 4 * n_heads  # + the log-sum-exp per head


def saved_by_autograd(block, x, autocast_dtype):
    """block(x) under autocast (None: fp32): its output, and the bytes autograd saved, parameters left out."""
    params = {p.untyped_storage().data_ptr() for p in block.parameters()}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast(
            DEVICE, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None
        ):
            out = block(x)
    return out, sum(storages.values())


torch.manual_seed(0)
act_block = TransformerBlock(D_MODEL, HEADS).to(DEVICE)
act_tokens = BATCH_SIZE * SEQ_LEN
rows = []
for dtype, act_bytes in ((None, 4), (torch.bfloat16, 2)):
    out, saved = saved_by_autograd(act_block, block_input, dtype)
    weight_copies = 12 * D_MODEL**2 * act_bytes if dtype is not None else 0
    predicted = activation_bytes_per_token(D_MODEL, HEADS, act_bytes) * act_tokens + weight_copies
    rows.append(
        (
            "fp32" if dtype is None else "bf16 autocast",
            activation_bytes_per_token(D_MODEL, HEADS, act_bytes),
            f"{predicted / MiB:.2f}",
            f"{saved / MiB:.2f}",
            f"{saved / predicted - 1:+.2%}",
        )
    )
    # Besides A x tokens, autograd saves a few tensors of a few bytes (e.g. the attention's RNG state).
    assert abs(saved - predicted) <= 0.01 * predicted, (dtype, saved, predicted)
    del out
show_table(["forward", "A (bytes/token)", "predicted MiB", "saved MiB", "difference"], rows)

if DEVICE == "cuda":
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = act_block(block_input)
    forward_bytes = torch.cuda.memory_allocated() - before
    predicted = activation_bytes_per_token(D_MODEL, HEADS, 2) * act_tokens + 12 * D_MODEL**2 * 2
    print(
        f"bf16 forward of {act_tokens} tokens: allocated {forward_bytes / MiB:.1f} MiB, "
        f"formula {predicted / MiB:.1f} MiB"
    )
    # 2%: the allocator rounds every block up to a multiple of 512 bytes, and SDPA keeps a few small tensors.
    assert abs(forward_bytes - predicted) <= 0.02 * predicted, (forward_bytes, predicted)
    RESULTS["memory"] = (
        f"activations {activation_bytes_per_token(D_MODEL, HEADS, 2)} B/token (formula = allocator within 2%)"
    )
    del out
else:
    print("Allocator check skipped on CPU: it reads the CUDA caching allocator's counters.")
del act_block

# %% [markdown]
# ### Where the memory of a training step goes
#
# `torch.cuda.memory._record_memory_history` makes the caching allocator log every allocation and free with
# the Python stack that caused it; a snapshot holds that log plus the allocator's segments.
# `common.profiling.memory_history()`, `memory_snapshot()` and `summarize_snapshot()` wrap it, and
# `dump_memory_snapshot()` writes a file that <https://pytorch.org/memory_viz> draws interactively. We record
# two training steps of the transformer block from part 3.

# %%
if DEVICE == "cuda":
    torch.cuda.empty_cache()
    torch.manual_seed(0)
    block = TransformerBlock(D_MODEL, HEADS).to(DEVICE)
    block_optimizer = torch.optim.AdamW(block.parameters(), lr=1e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with profiling.memory_history():
        for _ in range(2):
            amp.train_step(block, block_input, block_target, F.mse_loss, block_optimizer, "bf16")
        torch.cuda.synchronize()
        snapshot = profiling.memory_snapshot()
        snapshot_path = profiling.dump_memory_snapshot(WORK / "block_step.pickle")
    summary = profiling.summarize_snapshot(snapshot, device=torch.cuda.current_device())
    print(summary)
    print(f"snapshot for https://pytorch.org/memory_viz: {Path(snapshot_path).relative_to(REPO_ROOT)}")
    timeline = profiling.memory_timeline(snapshot, device=torch.cuda.current_device())

    params = sum(p.numel() * p.element_size() for p in block.parameters())
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot((timeline + base) / GiB, linewidth=1)
    ax.axhline(
        (base + 4 * params) / GiB,
        color="grey",
        linestyle=":",
        label="weights + grads + AdamW state (4x weights)",
    )
    ax.set_xlabel("allocator event (alloc or free)")
    ax.set_ylabel("allocated GiB")
    ax.set_title("Two training steps of a transformer block, bf16 autocast")
    ax.legend(fontsize=8)
    plt.tight_layout()
    plt.show()
    expected_peak = torch.cuda.max_memory_allocated() - base
    assert abs(summary.peak_delta_bytes - expected_peak) <= 0.01 * expected_peak, (
        summary.peak_delta_bytes,
        expected_peak,
    )
    RESULTS["memory"] += (
        f"; block step: peak {summary.peak_delta_bytes / GiB:.2f} GiB above {base / GiB:.2f} GiB before the steps; "
        f"weights {params / GiB:.2f} GiB"
    )
    del block, block_optimizer, snapshot
else:
    print("Skipped on CPU: memory snapshots record the CUDA caching allocator.")

# %% [markdown]
# Reading the timeline from left to right: the first forward pass allocates activations (the rising edge),
# saved for the backward pass; backward frees them as it goes while allocating gradients; the first
# optimizer step allocates AdamW's two state tensors per weight, which stay. The second step repeats the
# sawtooth on top of the higher floor. Activation memory grows with batch x sequence length, the floor with
# the parameter count: the two things that activation checkpointing (week 5) and sharding (week 6) attack.
#
# ## Summary
#
# - Low precision needs range more than precision: fp16 flushes small gradients to zero, and not evenly (the
#   targets' logit gradients survive, the others' do not), so training without a scaler diverges; loss
#   scaling (`torch.amp.GradScaler`) lifts them back, and bf16, with fp32's range, needs no scaler at all.
# - Tensor cores make a matmul-bound step several times faster in bf16 than in fp32, if shapes are multiples
#   of 8; fp8 doubles the peak rate again, with per-tensor scales and an order of magnitude more rounding
#   error. `torch.compile` fuses what the matmuls leave: normalisations, activations, casts.
# - Keep the GPU fed: worker processes for decoding and augmentation, pinned memory for copies, GPU decoding
#   where the CPU can't keep up, and as little padding as possible.
# - Profile before optimising: labelled ranges and op counts point at the bottleneck; a host-device sync in
#   the loop (it shows as `cudaStreamSynchronize`) and a per-sample Python loop are the usual suspects.
# - Activation memory is what autograd saves: for this block 36d + 4h + 16 bytes per token in bf16, no
#   seq x seq term with fused attention; checked against what the allocator hands out.

# %% tags=["summary"]
for key, line in RESULTS.items():
    print(f"{key}: {line}")
