"""Where one training step's memory goes, predicted term by term for common.models.llama, and measured.

    step = predict_step_memory(LlamaConfig.preset("125m"), batch=8, seq_len=1024,
                               param_dtype=torch.float32, compute_dtype=torch.bfloat16)
    step.peak, step.peak_phase      # bytes, and when in the step it happens

What you will learn: the four things that fill a GPU in training (parameters, gradients, optimizer states,
activations), why the activations grow with batch x sequence and the rest does not, which tensors each op
keeps for its backward (and so what activation checkpointing and flash attention save), why the loss of a
32000-word vocabulary can need more memory than a whole transformer layer, and when in the step the peak
comes. `measure_saved_activations` counts what autograd really keeps and `measure_step_memory` the real
peak of a step (on a GPU from CUDA's allocator, on a CPU from the profiler); the tests hold the formulas
to both.

Notation: T = batch * seq_len tokens, d = d_model, f = d_ff, A = n_heads * head_dim (the width of the
attention, query heads), H = n_heads, V = vocab_size, L = n_layers, N = count_parameters(config).
Bytes: p = param_dtype (parameters, their gradients, AdamW's states, the residual stream), c =
compute_dtype (matmul inputs and outputs; c = p without autocast). Under autocast ("autocast" below) each
matmul casts its input to c afresh (autocast caches casts of weights only), so a tensor read by k matmuls
is saved k times in c.

Saved for backward by one block (activations_per_layer), op by op, in bytes:

    RMSNorm, computed in fp32:  x in fp32 (pow, mul)                 T d 4
                                1 / rms (rsqrt, mul)                  T 4
                                x / rms, cast back to p (mul weight)  T d p
                                its output, as each consumer saves it T d c   (x k consumers if autocast)
    attention_norm: 3 consumers (wq, wk, wv); ffn_norm: 2 (w1, w3)
    rotary (autocast only):     cos and sin cast to c, for q and k    4 s (head_dim / 2) c
    attention, "flash":         q, k and v (k, v repeated to the      3 T A c
                                query heads), output (also wo's input) T A c
                                log-sum-exp per query and head        b H s 4
               "efficient":     as flash, but the log-sum-exp padded  b H ceil(s / 32) 32 4
                                to a multiple of 32 queries
               "math":          q and k scaled, v                     3 T A u
                                the softmax probabilities             b H s^2 u
                                the output, copied for wo (not a view) T A c
                                (u = 4: fp16/bf16 are upcast to fp32 unless
                                torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp(True))
    SwiGLU:                     w1 x (silu), silu(w1 x) and w3 x (the product), the product (w2)   4 T f c
    weights (autocast only):    each matmul weight cast to c          layer_matmul_parameters c

Korthikanti et al. (2022, "Reducing Activation Recomputation in Large Transformer Models") count
34 s b h + 5 a s^2 b bytes per GPT layer in fp16; the same bookkeeping for this block differs in three
places: RMSNorm keeps fp32 statistics and copies, SwiGLU keeps four d_ff-wide tensors instead of GELU's two,
and flash attention keeps no s^2 term at all (the "math" implementation brings it back).

With full checkpointing a block keeps only its input (T d p) and recomputes the rest in the backward.

Outside the blocks: the token ids (embedding) and the targets (loss), T 8 each; the final norm with one
consumer; the output weight's cast (autocast); the log-probabilities log_softmax keeps, T V 4 (the loss
upcasts the logits to fp32); nll_loss's total weight, 4.

Always there: parameters N p, the rotary tables (buffers) max_seq_len head_dim p, AdamW's two states
2 N p (SGD without momentum: none); gradients N p from the backward until they are set to None.

The peak. The step is forward, backward, optimizer.step(), in the steady state (AdamW's states exist,
gradients were set to None). Candidates, largest wins:

- at the end of the forward, in the loss: every activation, and the fp32 logits beside the
  log-probabilities, T V 4. Under autocast also the final norm's output, T d p, which only its cast is saved
  of but the loss holds as its argument; and with checkpointing, the blocks' weight casts, which autocast's
  cache holds until the forward ends although no saved tensor keeps them, layer_matmul_parameters L c.
  Rarely the peak (the loss's backward holds two T V 4 tensors where this holds one), but with
  checkpointing under autocast and a large model it is.
- at the loss's backward: parameters, buffers, optimizer states, every activation, and the gradient of the
  log-probabilities and that of the logits, T V 4 each, beside the saved log-probabilities. With a large
  vocabulary and many tokens this is the peak: three fp32 T x V tensors at once.
- in the backward of block l (last to first): the blocks below l still hold their activations, the
  gradients of the blocks above l exist, and the block's own backward holds temporaries, at their largest
  when SwiGLU's product is differentiated: the incoming residual gradient T d p, the product's gradient
  and the two it makes less the product itself (freed by w2's backward) 2 T f c, and w2's weight gradient
  d f p. With checkpointing, block l's activations are recomputed and held during its backward as well
  (those of the uncheckpointed block, less its input, which the checkpoint kept).
- in optimizer.step(): parameters + gradients + states + the foreach AdamW's one temporary, the square
  roots of the second moments, N p. With a small batch (activations small) this is the peak.

Not counted: the CUDA context, cuBLAS workspaces, the caching allocator's rounding (512-byte blocks) and
fragmentation (torch.cuda.max_memory_allocated does not count reserved-but-free memory either), AdamW's
step counters (0-dim tensors on the host), the loss and other scalars, and the CPU RNG state each
checkpointed block keeps to replay dropout (5 KB of host memory per block).
"""

from __future__ import annotations

import gzip
import json
import math
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from common.models.llama import Llama, LlamaConfig, count_parameters, layer_matmul_parameters, random_batch

Attention = Literal["flash", "efficient", "math"]
ATTENTIONS = ("flash", "efficient", "math")
OPTIMIZER_STATES = {"adamw": 2, "sgd": 0}  # state tensors per parameter (SGD without momentum)
OPTIMIZER_TEMPORARIES = {"adamw": 1, "sgd": 0}  # parameter-sized temporaries of the foreach step

__all__ = [
    "ATTENTIONS",
    "MeasuredStep",
    "StepMemory",
    "measure_saved_activations",
    "measure_step_memory",
    "predict_step_memory",
]


@dataclass(frozen=True)
class StepMemory:
    """One training step's memory in bytes, by kind; `peak` is reached during `peak_phase`."""

    parameters: int
    buffers: int  # the rotary tables, cos and sin
    gradients: int
    optimizer_states: int
    activations_per_layer: int  # saved for backward by one block (its input only, with checkpointing)
    activations: int  # everything saved for backward at the end of the forward
    head_activations: int  # the part of it saved outside the blocks: final norm, output layer, loss
    loss_buffers: int  # the loss's gradients beside its saved log-probabilities, at the start of backward
    temporary: int  # the largest temporary of the peak's phase
    peak: int
    peak_phase: str
    phases: tuple[tuple[str, int], ...] = ()  # every candidate for the peak: (phase, bytes alive then)

    def rows(self) -> list[tuple[str, int]]:
        """(term, bytes) pairs for a table, in the order the docstring explains them."""
        return [
            (name, getattr(self, name))
            for name in self.__dataclass_fields__
            if name not in ("peak_phase", "phases")
        ]


def _norm_saved(tokens: int, d: int, p: int, c: int, consumers: int, autocast: bool) -> int:
    """RMSNorm: fp32 input, 1 / rms, x / rms in p, and its output as its consumers save it."""
    return tokens * d * 4 + tokens * 4 + tokens * d * p + tokens * d * c * (consumers if autocast else 1)


def _attention_saved(config: LlamaConfig, batch: int, seq_len: int, c: int, attention: Attention) -> int:
    tokens, width, heads = batch * seq_len, config.n_heads * config.head_dim, config.n_heads
    if attention == "math":
        u = max(c, 4)  # fp16/bf16 inputs are upcast to fp32 (allow_fp16_bf16_reduction_math_sdp is off)
        return 3 * tokens * width * u + batch * heads * seq_len**2 * u + tokens * width * c
    padded = seq_len if attention == "flash" else math.ceil(seq_len / 32) * 32
    return 4 * tokens * width * c + batch * heads * padded * 4


def _block_saved(
    config: LlamaConfig, batch: int, seq_len: int, p: int, c: int, autocast: bool, attention: Attention
) -> int:
    """Bytes one block saves for backward (no checkpointing); the module docstring's table, summed."""
    tokens, d = batch * seq_len, config.d_model
    rotary = 4 * seq_len * (config.head_dim // 2) * c if autocast else 0
    weights = layer_matmul_parameters(config) * c if autocast else 0
    return (
        _norm_saved(tokens, d, p, c, 3, autocast)
        + rotary
        + _attention_saved(config, batch, seq_len, c, attention)
        + _norm_saved(tokens, d, p, c, 2, autocast)
        + 4 * tokens * config.d_ff * c
        + weights
    )


def predict_step_memory(
    config: LlamaConfig,
    batch: int,
    seq_len: int,
    *,
    param_dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
    optimizer: str = "adamw",
    checkpointing: str = "none",
    attention: Attention = "flash",
) -> StepMemory:
    """Predict the memory of one training step of Llama(config) on batch x seq_len tokens.

    param_dtype: parameters, gradients, optimizer states. compute_dtype: the autocast dtype, or None (or
    param_dtype) for no autocast. optimizer: "adamw" (foreach, two states) or "sgd" (no momentum).
    checkpointing: "none", or "full" (every block recomputed in the backward). attention: what the
    attention saves, by implementation: "flash" (PyTorch's CPU SDPA and its CUDA FLASH backend, which
    takes fp16/bf16), "efficient" (CUDA's memory-efficient backend, what fp32 gets on a GPU), "math"
    (SDPA's math backend, which keeps the s x s probabilities). The formulas: the module docstring.
    """
    if config.use_kernels:
        raise ValueError(
            "predict_step_memory models the plain path (use_kernels=False); the Triton kernels save other "
            "tensors (the fused loss keeps gradients instead of log-probabilities): predict with use_kernels=False"
        )
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(
            f"optimizer={optimizer!r} is not modelled; choose one of {', '.join(OPTIMIZER_STATES)}"
        )
    if checkpointing not in ("none", "full"):
        raise ValueError(f"checkpointing={checkpointing!r}: choose 'none' or 'full'")
    if attention not in ATTENTIONS:
        raise ValueError(f"attention={attention!r}: choose one of {', '.join(ATTENTIONS)}")
    if seq_len > config.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds max_seq_len={config.max_seq_len} of the config")
    compute_dtype = compute_dtype or param_dtype
    autocast = compute_dtype != param_dtype
    p, c = param_dtype.itemsize, compute_dtype.itemsize
    tokens, d, vocab, n_layers = batch * seq_len, config.d_model, config.vocab_size, config.n_layers
    n_params = count_parameters(config)

    parameters = gradients = n_params * p
    buffers = config.max_seq_len * config.head_dim * p  # two tables of max_seq_len x head_dim / 2
    optimizer_states = OPTIMIZER_STATES[optimizer] * n_params * p
    full_block = _block_saved(config, batch, seq_len, p, c, autocast, attention)
    per_layer = tokens * d * p if checkpointing == "full" else full_block
    head = (
        _norm_saved(tokens, d, p, c, 1, autocast)
        + (vocab * d * c if autocast else 0)  # the output weight's cast
        + tokens * vocab * 4  # log-probabilities, fp32
        + 4  # nll_loss's total weight
    )
    inputs = 2 * tokens * 8  # token ids (embedding) and targets (loss), int64
    activations = inputs + n_layers * per_layer + head
    loss_buffers = 2 * tokens * vocab * 4

    static = parameters + buffers + optimizer_states
    layer_params = layer_matmul_parameters(config) + 2 * d  # + the block's two norms
    # The final norm's and the output projection's weight gradients, alive through every block's backward.
    # Tied or not: a tied weight's output-side gradient waits in autograd's input buffer for the embedding's.
    head_grads = (d + vocab * d) * p
    # At the backward of SwiGLU's product: the residual gradient coming in, the product's gradient and the
    # two it makes, less the product itself (freed by w2's backward), and w2's weight gradient.
    block_temporary = tokens * d * p + 2 * tokens * config.d_ff * c + config.d_ff * d * p
    if checkpointing == "full":
        block_temporary += full_block - tokens * d * p  # recomputed; its input was kept by the checkpoint
    forward_temporary = tokens * vocab * 4  # the fp32 logits, beside the log-probabilities
    if autocast:
        forward_temporary += tokens * d * p  # the final norm's output: its cast is what is saved
        if checkpointing == "full":  # the blocks' weight casts, in autocast's cache only
            forward_temporary += n_layers * layer_matmul_parameters(config) * c
    phases = [
        (
            "forward, in the loss (the fp32 logits)",
            forward_temporary,
            static + activations + forward_temporary,
        ),
        (
            "backward, at the loss (log-probabilities and two gradients of the logits' size)",
            0,
            static + activations + loss_buffers,
        ),
    ]
    for done in range(n_layers):  # backward of block n_layers - 1 - done: `done` blocks finished
        live = (
            static
            + head_grads
            + done * layer_params * p
            + activations
            - head
            - done * per_layer
            + block_temporary
        )
        phases.append((f"backward, in block {n_layers - 1 - done}", block_temporary, live))
    step_temporary = OPTIMIZER_TEMPORARIES[optimizer] * n_params * p
    phases.append(
        (
            "optimizer.step() (parameters, gradients, states and the step's temporary)",
            step_temporary,
            static + gradients + step_temporary,
        )
    )
    phase, temporary, peak = max(phases, key=lambda item: item[2])
    return StepMemory(
        parameters=parameters,
        buffers=buffers,
        gradients=gradients,
        optimizer_states=optimizer_states,
        activations_per_layer=per_layer,
        activations=activations,
        head_activations=head,
        loss_buffers=loss_buffers,
        temporary=temporary,
        peak=peak,
        peak_phase=phase,
        phases=tuple((name, live) for name, _, live in phases),
    )


def measure_saved_activations(model: Llama, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward of model.loss.

    Counted through torch.autograd.graph.saved_tensors_hooks: each saved tensor's whole storage, once
    (views of one tensor share it), on the device of tokens (a GPU op may keep small tensors on the host);
    parameters and buffers are model state, not activations, and are left out. targets default to a copy
    of tokens (a tensor of its own, as in training). Works on CPU and GPU.
    """
    state = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.device == tokens.device and storage.data_ptr() not in state:
            saved[storage.data_ptr()] = storage.nbytes()  # alive until backward, so no address is reused
        return tensor

    targets = tokens.clone() if targets is None else targets
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.loss(tokens, targets)
    return sum(saved.values())


@dataclass(frozen=True)
class MeasuredStep:
    """A measured training step: bytes of tensors alive (the allocator's rounding included on a GPU)."""

    before: int  # at the start: parameters, optimizer states, the batch (and, on a GPU, cuBLAS workspaces)
    peak: int  # the most at any moment of forward, backward and optimizer.step()


def _peak_on_gpu(step: Callable[[], None], device: torch.device) -> MeasuredStep:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return MeasuredStep(before=before, peak=torch.cuda.max_memory_allocated(device))


def _peak_on_cpu(step: Callable[[], None]) -> MeasuredStep:
    """The profiler's memory timeline: every tensor's allocation and free, tensors alive at the start included.

    The host allocator keeps no statistics, so this is the one way to see a CPU step's peak; it costs
    seconds even for a toy model (the profiler records every op with its stack).
    """
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
        acc_events=True,  # one step, no schedule: keep its events (and skip the warning that they are not)
    ) as profiler:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "timeline.json.gz"
        with warnings.catch_warnings():
            # Deprecated in favour of CUDA memory snapshots, which have no CPU counterpart.
            warnings.filterwarnings("ignore", "`export_memory_timeline` is deprecated", FutureWarning)
            profiler.export_memory_timeline(str(path), device="cpu")  # [times, bytes by category per time]
        _, sizes = json.loads(gzip.decompress(path.read_bytes()))
    totals = [sum(categories) for categories in sizes]
    return MeasuredStep(before=totals[0], peak=max(totals))


def measure_step_memory(
    model: Llama,
    batch: int,
    seq_len: int,
    *,
    compute_dtype: torch.dtype | None = None,
    optimizer: str = "adamw",
) -> MeasuredStep:
    """Measure the memory of one steady-state training step of model on a random batch, on its device.

    A first step creates the optimizer's states (and cuBLAS's workspaces) outside the measurement; the
    measured step then starts from gradients set to None, as predict_step_memory assumes. compute_dtype:
    the autocast dtype, or None for none. optimizer: "adamw" or "sgd", foreach, as predicted. The loss is
    model.loss, so a model whose blocks were wrapped (checkpointing) is measured as it is. The model's
    parameters take two steps of learning rate 1e-6. On a GPU the peak is torch.cuda.max_memory_allocated; on a CPU it comes from the profiler's memory
    timeline (slow: seconds for a toy model).
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(
            f"optimizer={optimizer!r} is not modelled; choose one of {', '.join(OPTIMIZER_STATES)}"
        )
    device = next(model.parameters()).device
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"measure_step_memory measures on CUDA or the CPU, but the model is on {device}")
    tokens, targets = random_batch(model.config, batch, seq_len, device=device)
    # A tiny learning rate: the step must run, not train; weight decay off, to change nothing it need not.
    opt = (
        torch.optim.AdamW(model.parameters(), lr=1e-6, weight_decay=0.0, foreach=True)
        if optimizer == "adamw"
        else torch.optim.SGD(model.parameters(), lr=1e-6, foreach=True)
    )

    def step() -> None:
        with torch.autocast(
            device.type, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None
        ):
            loss = model.loss(tokens, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up, not measured
    return _peak_on_gpu(step, device) if device.type == "cuda" else _peak_on_cpu(step)
