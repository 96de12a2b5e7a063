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
# # Week 9 seminar: inference algorithms
#
# A trained model spends its life producing one token per forward pass. This seminar follows the lecture:
# first what bounds that forward pass, then the ways to get more tokens out of each byte it reads, each one
# measured and each one checked to give the answers it promises.
#
# 1. **Decoding is memory-bound**: decode-shaped GEMMs (1 to 256 token rows times a Llama-3-8B weight)
#    timed on the GPU and placed on its roofline.
# 2. **The KV cache**: its size, by formula and by the buffers `CachedDecoder` allocates; cached generation
#    against recomputing the whole sequence.
# 3. **Speculative decoding**: the target's own tokens with any draft; tokens per round against the formula
#    for several draft lengths; tokens/s against plain decoding on the GPU (`effdl bench speculative`'s
#    functions).
# 4. **Quantization**: each method's error against a float64 model and its decode speed
#    (`effdl bench quantization`'s functions).
# 5. **Split-K**: the decode GEMMs of section 1, our Triton kernel with and without splitting K.
# 6. **Batching**: decode throughput against the batch size with the static cache, and where continuous
#    batching and paged attention come in.
#
# Everything runs on a CPU at small sizes (CI does); the timings that the lecture's argument rests on need a
# GPU, and those cells say so where there is none. Cells that state a fact check it with `assert`. Where a
# sentence describes a GPU measurement, it says what the cell measures and what its `assert` checks; the
# numbers are the ones the cell prints.

# %% tags=["parameters"]
import os

import torch

# SMALL: tiny models and short timings (a laptop, CI); full: the sizes of `effdl bench speculative` and of the
# lecture on a GPU. `effdl seminar --small/--full` and CI set EFFDL_SMALL; the default is full on a GPU machine.
SMALL = os.environ.get("EFFDL_SMALL", "0" if torch.cuda.is_available() else "1") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# %%
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np

from common.bench import bench
from common.environment import environment
from common.hardware import SPECS, attainable_flops, gpu_spec, plot_roofline, ridge_point
from common.inference.generate import generate
from common.inference.kv_cache import CachedDecoder
from common.inference.quantization import METHODS
from common.inference.quantization_benchmark import LAYOUTS, QuantizationBenchmark, error_part, speed_part
from common.inference.speculative import expected_tokens_per_round, speculative_generate
from common.inference.speculative_benchmark import GOAL_SPEEDUP, SpeculativeBenchmark, measure
from common.kernels.benchmark import measure_case
from common.kernels.matmul import DECODE_GOAL_MAX_M, MEDIUM_GOAL, SPLIT_GOAL, decode_benchmark_cases
from common.models.llama import Llama, LlamaConfig, count_parameters
from common.tables import show_table

torch.manual_seed(0)
RESULTS: dict[str, str] = {}  # key results, printed by the last cell
GPU = DEVICE == "cuda"
if not GPU:
    # The CPU runs tiny models, op by op: a second thread only adds waiting, a lot of it on a busy machine.
    torch.set_num_threads(1)
spec = gpu_spec(DEVICE) if GPU else SPECS["H200"]  # on a CPU, the H200's datasheet for the arithmetic
env = environment(DEVICE)
print(
    f"device: {env['gpu'] or env['cpu']}; {'small' if SMALL else 'full'} sizes; roofline of the {spec.name}"
)

# %% [markdown]
# ## 1. Decoding is memory-bound
#
# A decode step multiplies $M$ token rows (the sequences decoded together) by every weight matrix
# $(K \times N)$ of the model. It does $2MNK$ FLOPs and must read the weight's $2KN$ bytes (bf16) at least
# once, so its arithmetic intensity is about $M$ FLOP per byte while $M \ll K, N$. The GPU's ridge point,
# peak FLOP/s over bandwidth, is the intensity where compute starts to bind; below it, the time of a GEMM is
# the weight's bytes over the bandwidth, whatever the FLOPs. The cell computes the ridge from the datasheet
# (`common.hardware`) and checks that the decode-shaped GEMMs of the sweep below sit under it for every $M$
# up to 64.

# %%
K_DOWN, N_DOWN = 14336, 4096  # Llama-3-8B's MLP down projection, the weight of the roofline's points
ridge = ridge_point(spec, "bf16")


def intensity(m: int, n: int = N_DOWN, k: int = K_DOWN) -> float:
    """FLOP per byte of a bf16 (m x k) @ (k x n) GEMM that reads each input and writes the output once."""
    return 2 * m * n * k / (2 * (m * k + k * n + m * n))


show_table(["rows M", "FLOP per byte"], [(m, f"{intensity(m):.1f}") for m in (1, 16, 64, 256)])
print(f"ridge of the {spec.name} in bf16: {ridge:.0f} FLOP/byte")
assert all(intensity(m) < ridge for m in (1, 16, 64)), "decode-shaped GEMMs are under the ridge"
assert all(0.9 * m < intensity(m) <= m for m in (1, 16, 64)), "about M FLOP per byte while M << K, N"

# %% [markdown]
# On the GPU: the decode sweep of `effdl bench kernels --kernel matmul_decode` (`decode_benchmark_cases`, each
# case timed by `measure_case`: cuBLAS and our Triton kernel interleaved, L2 flushed before each repetition),
# M = 1 to 256 rows times Llama-3-8B's MLP down projection (the benchmark also times the other two weights).
# This cell draws cuBLAS's points on the roofline; section 5 reads the same rows for split-K. The assert
# checks the lecture's claim: 64 rows cost less than twice the time of one row, although they do 64 times
# the FLOPs.

# %%
decode_rows: list[dict] = []
if GPU:
    cases = [case for case in decode_benchmark_cases(quick=SMALL) if case.label.startswith("mlp_down")]
    decode_rows = [measure_case(case, quick=SMALL, device=DEVICE) for case in cases]
    cublas = {row["x"]: row["baseline"] for row in decode_rows if row["label"].endswith("vs cuBLAS")}
    points = {f"M={m}": (intensity(m), side["tflops"] * 1e12) for m, side in cublas.items()}
    show_table(
        ["rows M", "cuBLAS µs", "TFLOP/s", "of the roof"],
        [
            (m, f"{side['median_ms'] * 1e3:.1f}", f"{side['tflops']:.1f}",
             f"{side['tflops'] * 1e12 / attainable_flops(intensity(m), spec, 'bf16'):.0%}")
            for m, side in cublas.items()
        ],
    )  # fmt: skip
    fig, ax = plt.subplots(figsize=(7, 4.5))
    plot_roofline(ax, spec, "bf16", points)
    plt.show()
    time_1 = cublas[1]["median_ms"]
    last = max(m for m in cublas if m <= 64)
    if not SMALL:
        assert cublas[64]["median_ms"] < 2 * time_1, "64 rows cost less than twice one row's time"
    RESULTS["decode GEMM"] = (
        f"cuBLAS, {last} rows: {cublas[last]['median_ms'] / time_1:.2f}x the time of 1 row"
    )
else:
    print("The decode-shaped GEMMs are timed on a GPU: this machine has none, so the sweep is skipped.")

# %% [markdown]
# ## 2. The KV cache
#
# Attention at position $t$ needs the keys and values of every earlier position. The cache keeps them:
# per token, $2 \cdot n_{layers} \cdot n_{kv} \cdot d_{head}$ numbers (keys and values, every layer, every
# kv head). `CachedDecoder` allocates it once, for `max_len` positions, so that every decode step has the
# same shapes (what CUDA graphs need). The cell computes the formula for the week-5 model sizes (in bf16)
# and checks it against the bytes of the buffers a `CachedDecoder` really allocates, built on PyTorch's
# meta device (shapes without memory). It also prints how much cache a full-length sequence takes next to
# the weights.


# %%
def kv_bytes_per_token(config: LlamaConfig, bytes_per_number: int = 2) -> int:
    """Keys and values of one token: every layer, every kv head, head_dim numbers each."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * bytes_per_number


rows = []
for name in ("125m", "350m", "1b"):
    config = LlamaConfig.preset(name)
    with torch.device("meta"):
        decoder = CachedDecoder(Llama(config).to(torch.bfloat16), batch_size=4, max_len=config.max_seq_len)
    allocated = sum(b.numel() * b.element_size() for b in decoder.cache.buffers())
    assert allocated == 4 * config.max_seq_len * kv_bytes_per_token(config), (
        name
    )  # the formula is what is allocated
    per_sequence = config.max_seq_len * kv_bytes_per_token(config)
    weights = 2 * count_parameters(config)
    rows.append((name, kv_bytes_per_token(config) // 1024, config.max_seq_len, f"{per_sequence / 2**20:.0f}",
                 f"{weights / per_sequence:.1f}"))  # fmt: skip
show_table(
    ["model", "KiB per token", "max_len", "MiB per full sequence", "sequences that equal the weights"], rows
)

# %% [markdown]
# The cache changes the work, not the result. Greedy generation through the cache (prefill the prompt,
# then one token per forward) against recomputing the whole sequence for every token: the same tokens,
# with about $n$ positions through the model instead of $n^2/2$. float64, so that the two ways of computing
# the logits agree far below any gap between two tokens.

# %%
toy = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
model = Llama(toy).double().eval()
prompt, new = torch.randint(0, 64, (2, 5)), 20
cached = generate(model, prompt, new)
tokens = prompt
with torch.no_grad():
    for _ in range(new):  # no cache: the whole sequence through the model every time
        tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
assert torch.equal(cached, tokens), "cached generation gives the tokens of recomputation"
print(f"positions through the model: cached {5 + new - 1}, recomputed {sum(range(5, 5 + new))}")

# %% [markdown]
# ## 3. Speculative decoding
#
# A draft proposes $k$ tokens one at a time; the target scores them all in one forward and keeps the
# longest prefix it agrees with, plus one token of its own. Under greedy decoding the rule keeps a draft
# token exactly when it is the target's argmax, so the output is the target's own, whatever the draft:
# a draft that never agrees costs one target forward per token (no worse than plain decoding), a perfect
# one $k + 1$ tokens per forward. The cell checks both ends with `speculative_generate`.

# %%
target, unrelated = Llama(toy).double().eval(), Llama(toy).double().eval()
prompt = torch.randint(0, 64, (1, 6))
plain = generate(target, prompt, 24)
rounds = {}
for name, draft in (("unrelated draft", unrelated), ("the target itself", target)):
    out, stats = speculative_generate(target, draft, prompt, 24, draft_len=4)
    assert torch.equal(out, plain), f"{name}: speculative decoding returns the target's tokens"
    rounds[name] = stats.rounds
print(f"target forwards for 24 tokens: {rounds}")
assert rounds["the target itself"] == 5, "a perfect draft: 5 rounds of k + 1 = 5 tokens"
assert rounds["unrelated draft"] > rounds["the target itself"], "a draft that agrees less needs more rounds"
assert rounds["unrelated draft"] <= 24, "a draft that never agrees: one target forward per token, at worst"

# %% [markdown]
# How many tokens a round gives: if the target keeps each draft token with probability $\alpha$, the mean
# is $(1 - \alpha^{k+1}) / (1 - \alpha)$ (`expected_tokens_per_round`). `measure` of
# `common.inference.speculative_benchmark` (what `effdl bench speculative` saves) builds a target and a
# draft made of its first layer, measures $\alpha$ (how often the draft's greedy choice is the target's, over
# the generated tokens), and runs speculative decoding for several $k$, counting the tokens per round; on a
# GPU it also times each $k$ against plain decoding on the same static KV cache, alternately. In small mode
# the models are tiny; in full mode on a GPU they are the benchmark's: a random target with Llama-3-8B's
# layer shape whose later layers are made quiet, so that its first layer, the draft, is often right. The
# draft runs in bf16 and the target in fp32: the draft only proposes, and every token it proposes is checked
# by the target, so its precision changes how often it is right (alpha), never the output.
#
# The asserts check that every count lies between 1 and $k + 1$ tokens per round, and that at small sizes
# every $k$ gave exactly plain decoding's tokens; at full size `measure` itself raises unless every token is
# the target's greedy choice, up to a near-tie (batched and one-token forwards round differently on a GPU). The formula assumes each token is accepted
# independently with the same $\alpha$; a greedy model's positions are neither, so the two curves are close,
# not equal: the plot shows how close.

# %%
# The benchmark's models and draft lengths; shorter timings than `effdl bench speculative` in full mode.
bench_config = (
    replace(SpeculativeBenchmark.quick(), draft_lens=(1, 2, 4, 8), new_tokens=32)
    if SMALL
    else replace(SpeculativeBenchmark(), warmup_ms=100.0, rep_ms=500.0)
)
speculative = measure(bench_config, torch.device(DEVICE))
by_k = {row["draft_len"]: row for row in speculative["draft_lengths"]}
alpha = speculative["alpha"]
show_table(
    ["k", "rounds", "tokens per round", "formula", "same tokens as plain"],
    [(k, r["rounds"], f"{r['tokens_per_round']:.2f}", f"{r['predicted_tokens_per_round']:.2f}",
      "yes" if r["identical_tokens"] else "near-tie") for k, r in by_k.items()],
)  # fmt: skip
print(f"alpha = {alpha:.3f}; plain decoding and speculative decoding on {speculative['machinery']} decoders")
ks = np.arange(1, max(by_k) + 1)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(list(by_k), [r["tokens_per_round"] for r in by_k.values()], "o-", label="measured")
ax.plot(
    ks, [expected_tokens_per_round(alpha, int(k)) for k in ks], "--", label=f"formula, alpha = {alpha:.2f}"
)
ax.plot(ks, ks + 1, ":", color="gray", label="k + 1 (every draft token kept)")
ax.set_xlabel("draft length k")
ax.set_ylabel("tokens per target forward")
ax.legend()
plt.show()
assert all(1 <= r["tokens_per_round"] <= k + 1 for k, r in by_k.items())
assert all(r["identical_tokens"] or not SMALL for r in by_k.values()), "small sizes: no near-tie"
RESULTS["speculative, tokens per round"] = ", ".join(
    f"k={k}: {r['tokens_per_round']:.2f} (formula {r['predicted_tokens_per_round']:.2f})"
    for k, r in by_k.items()
)

# %% [markdown]
# What that buys in time. The same run timed plain decoding and speculative decoding of the same tokens,
# alternately; the speedup is the median of the per-pair ratios. On a GPU the draft's steps and the target's
# forward over $k + 1$ tokens are not free, so the best $k$ balances the tokens a round gains against the
# draft's cost. The asserts (full size, on a GPU) check that speculative decoding is faster than plain
# decoding at every $k$, and the course's bar for this benchmark: at least 2.0x at the best $k$.

# %%
if GPU:
    show_table(
        ["k", "plain tokens/s", "speculative tokens/s", "speedup"],
        [(k, f"{r['plain_tokens_per_s']:.0f}", f"{r['speculative_tokens_per_s']:.0f}", f"{r['speedup']:.2f}x")
         for k, r in by_k.items()],
    )  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(list(by_k), [r["speedup"] for r in by_k.values()], "o-")
    ax.axhline(1.0, color="gray", linestyle=":")
    ax.set_xlabel("draft length k")
    ax.set_ylabel("speedup over plain decoding")
    plt.show()
    goal = speculative["goal"]
    if not SMALL:
        assert all(r["speedup"] > 1.0 for r in by_k.values()), "faster than plain decoding at every k"
        assert goal["speedup"] >= GOAL_SPEEDUP, f"the issue's bar: >= {GOAL_SPEEDUP}x at the best k"
    RESULTS["speculative, speedup"] = f"{goal['speedup']:.2f}x at k={goal['best_draft_len']}"
else:
    print("Tokens/s are compared on a GPU: this machine has none (the CPU times above are not the lesson).")

# %% [markdown]
# ## 4. Quantization: error against speed
#
# Weight-only int8 and int4 store fewer bytes per weight; fp8 and SmoothQuant's W8A8 quantize the
# activations too. `error_part` of `effdl bench quantization` trains a small Llama on the trigram language
# and measures each method against a float64 copy of it: the held-out loss, the relative error of the
# logits. `speed_part` times batch-1 decoding of each quantized model against the unquantized one, in the
# same static cache, compiled with CUDA graphs on a GPU. Every method quantizes every linear layer, the
# output layer too. Each quantized model has q|k|v and gate|up merged into one matmul each
# (`fuse_projections`: fewer, longer matrix-vector products; the compiler cannot merge layers whose kernels
# it cannot see into) and computes attention over the cache as products and sums that the compiler fuses
# (`attention="reductions"`), not by repeating the cache for each query group. The bf16 baseline is timed
# in three layouts (separate or merged projections with SDPA, merged with reductions) and the fastest kept.
# fp8 needs fp8 tensor cores, and is skipped elsewhere. To keep the seminar short, the speed part decodes 2
# of the 8B preset's 32 layers here (Llama-3-8B's matrices; the benchmark times 4, and its JSON records the
# course's bar: int8 at least 1.5x bf16's tokens/s). The plot puts each method at its error and its
# speedup; the asserts check that int8's error is less than half of int4's (8 bits against 4 on the same
# weights) and, on the GPU at full size, that int8 decodes faster than bf16.

# %%
quant = (
    QuantizationBenchmark.quick()
    if SMALL
    else replace(QuantizationBenchmark(), speed_changes={"n_layers": 2}, warmup_ms=100.0, rep_ms=500.0)
)
dtype = torch.bfloat16 if GPU else torch.float32
errors = error_part(quant, torch.device(DEVICE), dtype)
speeds = speed_part(quant, torch.device(DEVICE), dtype)
measured = [m for m in METHODS if "skipped" not in errors["methods"][m]]
show_table(
    ["method", "held-out loss", "logits rel. error", "decode tokens/s", "speedup"],
    [("float64", f"{errors['float64_loss']:.4f}", "-", "-", "-"),
     (f"{dtype} (baseline)", f"{errors['baseline']['loss']:.4f}",
      f"{errors['baseline']['logits_relative_error']:.2e}", "-", "-")]
    + [(m, f"{errors['methods'][m]['loss']:.4f}", f"{errors['methods'][m]['logits_relative_error']:.2e}",
        f"{speeds['methods'][m]['tokens_per_s']:.0f}", f"{speeds['methods'][m]['speedup']:.2f}x") for m in measured],
)  # fmt: skip
reference_layout, *other_layouts = LAYOUTS
assert len(LAYOUTS) == 3 and list(speeds["baseline_layouts"]) == other_layouts, "timed in 3 layouts"
show_table(
    [f"{dtype} baseline layout", f"decode speed over '{reference_layout}'"],
    [(reference_layout, "1.00x")]
    + [(layout, f"{c.speedup:.2f}x") for layout, c in speeds["baseline_layouts"].items()],
)
print(f"kept as the baseline: {speeds['baseline_layout']}")
fig, ax = plt.subplots(figsize=(6, 3.5))
for m in measured:
    x, y = errors["methods"][m]["logits_relative_error"], speeds["methods"][m]["speedup"]
    ax.plot([x], [y], "o")
    ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, 5))
ax.set_xscale("log")
ax.axhline(1.0, color="gray", linestyle=":")
ax.set_xlabel(f"relative error of the logits against float64 ({dtype} baseline at 1.0x)")
ax.set_ylabel(f"decode tokens/s over {dtype}")
ax.set_title("on a CPU: speeds of eager code, not the lesson" if not GPU else f"batch 1, {env['gpu']}")
plt.show()
int8, int4 = errors["methods"]["int8"], errors["methods"]["int4"]
assert int8["logits_relative_error"] < 0.5 * int4["logits_relative_error"], "8 bits: under half 4 bits' error"
int8_speedup = speeds["methods"]["int8"]["speedup"]
if GPU and not SMALL:
    assert int8_speedup > 1.0, "int8 weights decode faster than bf16 ones at batch 1"
RESULTS["quantization"] = (
    f"logits error int8 {int8['logits_relative_error']:.1e}, int4 {int4['logits_relative_error']:.1e}; "
    f"int8 decode {int8_speedup:.2f}x {dtype}" + ("" if GPU else " (CPU, eager)")
)

# %% [markdown]
# ## 5. Split-K for a few rows
#
# With a few token rows a GEMM has few output tiles: a 4096-wide output in tiles of 128 columns keeps 32
# programs busy on a GPU of 132 SMs. Our Triton kernel (`common.kernels.matmul`) then cuts K into slices,
# one program per (tile, slice), and adds the partial tiles in a fixed order. Whether slices pay on top of
# short tiles depends on the GPU and the shape, so on a GPU `matmul_forward` times its rule's split against
# one slice at a shape's first call and keeps the faster (the label's S= is the split kept). Section 1's
# sweep timed it on the down projection, for every M, against cuBLAS and against itself with `split_k=1`
# (the same short tiles in one slice: what the slices add on their own), and for M up to 16 on a Hopper GPU
# against the tiled kernel that never splits K (the TMA kernel of large M, with tiles of 64 rows or more).
# The asserts (full size, on the GPU) check the course's bars for M up to 16: the small-M path at least 1.2x
# the tiled kernel (where it ran) and at least 0.9x cuBLAS; and that the split kept is no slower than one
# slice by more than 5% (room for the timing's noise).

# %%
if GPU:
    small_m = [row for row in decode_rows if row["x"] <= DECODE_GOAL_MAX_M]
    show_table(
        ["case", "speedup"],
        [(row["label"], f"{row['speedup']:.2f}x") for row in small_m],
    )
    worst = {  # "vs tiled" runs on Hopper or newer only (the TMA kernel)
        against: min(row["speedup"] for row in small_m if row["label"].endswith(against))
        for against in ("vs tiled", "vs unsplit", "vs cuBLAS")
        if any(row["label"].endswith(against) for row in small_m)
    }
    print(f"M <= {DECODE_GOAL_MAX_M}, the worst case: {worst}")
    if not SMALL:  # the bars
        if "vs tiled" in worst:
            assert worst["vs tiled"] >= SPLIT_GOAL.value, f"split-K {SPLIT_GOAL.text} for M <= 16"
        assert worst["vs cuBLAS"] >= MEDIUM_GOAL.value, f"split-K {MEDIUM_GOAL.text} for M <= 16"
        assert worst["vs unsplit"] >= 0.95, "the split kept is no slower than one slice"
    RESULTS["split-K, M <= 16"] = "worst " + ", ".join(f"{v:.2f}x {k[3:]}" for k, v in worst.items())
else:
    print("Split-K is timed on a GPU: this machine has none (Triton's interpreter checks it, not its speed).")

# %% [markdown]
# ## 6. Batching: more sequences per weight read
#
# A decode step reads every weight once whatever the batch, so on a GPU, where that read sets the step's time,
# decoding $B$ sequences together costs little more than one until $B$ nears the ridge point, or until the
# KV caches (one per sequence) outweigh the weights. (A CPU's small run is not bound the same way: its step
# time grows with the batch sooner.) The cell times one decode step of a static cache (`CachedDecoder`, position 32 of 64) for
# several batch sizes with `common.bench` (on a GPU the step is captured in a CUDA graph, so the GPU's time
# is measured, not Python's), and plots the tokens/s: $B$ over the step time. The assert (full size, on the
# GPU) checks that a batch of 64 gives at least 8 times the tokens/s of one sequence.

# %%
if GPU and not SMALL:
    batch_config, batch_dtype, batches = (
        LlamaConfig.preset("1b", max_seq_len=64),
        torch.bfloat16,
        (1, 4, 16, 64, 256),
    )
else:
    batch_config = LlamaConfig(
        vocab_size=256, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=768, max_seq_len=64
    )
    batch_dtype, batches = torch.float32, (1, 4, 16)
batch_model = Llama(batch_config).to(device=DEVICE, dtype=batch_dtype).eval()
step_ms = {}
with torch.no_grad():
    for b in batches:
        decoder = CachedDecoder(batch_model, b, 64)
        token = torch.zeros(b, 1, dtype=torch.long, device=DEVICE)
        position = torch.tensor([32], device=DEVICE)
        result = bench(lambda d=decoder, t=token, p=position: d(t, p), cuda_graph=GPU, device=DEVICE)
        step_ms[b] = result.median_ms
        del decoder
tokens_per_s = {b: b / (ms / 1e3) for b, ms in step_ms.items()}
show_table(
    ["batch", "step ms", "tokens/s", "over batch 1"],
    [
        (b, f"{step_ms[b]:.3f}", f"{tokens_per_s[b]:.0f}", f"{tokens_per_s[b] / tokens_per_s[1]:.1f}x")
        for b in batches
    ],
)
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot(list(tokens_per_s), list(tokens_per_s.values()), "o-", label="measured")
ax.plot(
    list(tokens_per_s), [b * tokens_per_s[1] for b in tokens_per_s], ":", color="gray", label="B x batch 1"
)
ax.set_xscale("log")
ax.set_yscale("log")
ax.set_xlabel("sequences decoded together")
ax.set_ylabel("tokens/s")
ax.legend()
plt.show()
if GPU and not SMALL:
    assert tokens_per_s[64] >= 8 * tokens_per_s[1], "a batch of 64 gives at least 8x the tokens/s of one"
RESULTS["batching"] = (
    f"batch {batches[-1]}: {tokens_per_s[batches[-1]] / tokens_per_s[1]:.1f}x the tokens/s of 1"
)
del batch_model

# %% [markdown]
# Where continuous batching and paged attention come in. The measurement above assumes the batch stays full.
# A server's requests arrive and end at different times: with static batching a batch runs until its longest
# sequence ends, and finished sequences idle in their slots. **Continuous batching** (Orca, OSDI 2022)
# re-forms the batch at every decode step: a finished sequence leaves, a waiting one joins, so the batch,
# and the tokens/s it gives, stays near the top of the curve. How many sequences fit is then set by KV-cache
# memory (section 2), and a static cache reserves `max_len` positions for every sequence. **Paged
# attention** (vLLM, SOSP 2023) allocates the cache in blocks of a few tokens as a sequence grows, through a
# block table per sequence, so a sequence wastes less than one block, more sequences fit, and the batch grows.
# `common.inference` keeps the static cache: the simplest, and what CUDA graphs need.

# %% [markdown]
# ## Summary
#
# - A decode step reads every weight to do a few FLOPs with it: it sits under the memory roof, and the
#   techniques of this week raise the useful work per byte read.
# - The KV cache computes each token's keys and values once, at a cost in memory that grows with every
#   token of every sequence; it gives the same tokens as recomputation.
# - Speculative decoding returns the target's tokens with any draft; a draft that is often right gives
#   several tokens per target forward, close to what the formula predicts from $\alpha$.
# - Quantization trades error for bytes: int8's error is under half of int4's; on a GPU, where batch-1
#   decoding waits on reading the weights, fewer bytes per weight make it faster (section 4 asserts it
#   there; on a CPU, eager, it need not be).
# - Split-K gives a GEMM of a few rows enough programs to stream its weight with the whole GPU.
# - Batching shares each weight read between sequences; continuous batching keeps the batch full, and paged
#   attention lets more sequences fit.

# %% tags=["summary"]
for key, line in RESULTS.items():
    print(f"{key}: {line}")
