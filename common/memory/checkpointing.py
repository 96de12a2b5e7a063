"""Activation checkpointing: keep less of the forward pass for backward, and recompute the rest.

    model = Llama(LlamaConfig())
    apply_activation_checkpointing(model, mode="selective")   # or "full"
    model.loss(tokens, targets).backward()                    # same gradients, less memory held

What you will learn:

- Backward needs tensors from the forward pass (a matmul's inputs, a norm's statistics, attention's
  softmax statistics). Without checkpointing autograd keeps all of them until backward, and for a
  transformer they outgrow the parameters at long sequences. `saved_activation_bytes` measures them.
- Full checkpointing (torch.utils.checkpoint with use_reentrant=False around each Block) keeps only each
  block's input and runs the block's forward again during backward: the least memory, one extra forward
  (about a third more matmul FLOPs per step).
- Selective checkpointing keeps the outputs of the expensive ops (matmuls, attention) and recomputes only
  the cheap elementwise ones (norms, RoPE, SiLU, residual adds), through the policy API
  (torch.utils.checkpoint.create_selective_checkpoint_contexts). No matmul runs twice; the memory saved
  is what the elementwise ops would have kept.
- `OpCounter` counts which ops run where, so a test can prove "zero matmuls re-run" rather than hope it.

Wrapping follows torchtitan's `apply_ac`: the model code knows nothing about checkpointing; each `Block`
of `model.layers` is replaced by a module that calls it under checkpoint.
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
    noop_context_fn,
)

from common.bench import BenchResult, bench
from common.models.llama import Block, Llama, LlamaConfig, random_batch

__all__ = [
    "MODES",
    "SAVE_OPS",
    "CheckpointMeasurement",
    "CheckpointedBlock",
    "OpCounter",
    "apply_activation_checkpointing",
    "measure_checkpointing",
    "saved_activation_bytes",
    "selective_policy",
]

Mode = Literal["full", "selective"]
MODES: tuple[str, ...] = ("full", "selective")

# Matmuls: nn.Linear on a (b, s, d) input reaches the dispatcher as aten.mm on a (b*s, d) view (addmm
# with a bias, bmm for batched products).
MATMUL_OPS = frozenset({torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default})
# F.scaled_dot_product_attention picks one of these kernels by device, dtype and shape: flash or
# memory-efficient or cuDNN on CUDA, flash_for_cpu on a CPU. The math fallback decomposes into bmm/softmax,
# so its matmuls are saved through MATMUL_OPS.
ATTENTION_OPS = frozenset(
    {
        torch.ops.aten._scaled_dot_product_flash_attention.default,
        torch.ops.aten._scaled_dot_product_efficient_attention.default,
        torch.ops.aten._scaled_dot_product_cudnn_attention.default,
        torch.ops.aten._scaled_dot_product_fused_attention_overrideable.default,
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    }
)
SAVE_OPS = MATMUL_OPS | ATTENTION_OPS


def selective_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Save the outputs of matmuls and attention (costly to recompute); recompute everything else.

    MUST_SAVE rather than PREFER_SAVE, so torch.compile's partitioner keeps the choice too.
    """
    return CheckpointPolicy.MUST_SAVE if op in SAVE_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class CheckpointedBlock(nn.Module):
    """A Block run under torch.utils.checkpoint: its activations are recomputed in backward.

    The block is a child module, so its parameters are still the model's (named layers.i.block.*).
    """

    def __init__(self, block: nn.Module, mode: Mode) -> None:
        super().__init__()
        self.block = block
        self.mode = mode

    def forward(self, *args: Any) -> Any:
        # A fresh pair of contexts per call: they hold this call's saved matmul outputs until its backward.
        context_fn: Callable[[], Any] = (
            functools.partial(create_selective_checkpoint_contexts, selective_policy)
            if self.mode == "selective"
            else noop_context_fn
        )
        # use_reentrant=False: works with inputs that don't require grad, with keyword arguments and with
        # torch.compile, and stops recomputing once backward has what it needs. preserve_rng_state stays on
        # (the default) so dropout, if a model had it, would draw the same mask when recomputed.
        return checkpoint(self.block, *args, use_reentrant=False, context_fn=context_fn)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


def apply_activation_checkpointing(model: nn.Module, mode: str = "full") -> nn.Module:
    """Wrap every Block of model.layers in a CheckpointedBlock (in place); return the model.

    mode "full": each block keeps only its input and reruns its whole forward in backward.
    mode "selective": each block also keeps its matmul and attention outputs; only elementwise ops rerun.
    Apply it after tensor parallelism and before torch.compile and FSDP, as torchtitan's parallelize() does:
    compile then sees the checkpointed region, and FSDP wraps the checkpointed block.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(repr(m) for m in MODES)}")
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleList):
        for name, layer in layers.named_children():
            if isinstance(layer, CheckpointedBlock):
                raise ValueError(
                    f"model.layers[{name}] is checkpointed already (mode={layer.mode!r}); apply "
                    "checkpointing once, to a fresh model"
                )
    if not isinstance(layers, nn.ModuleList) or not any(isinstance(layer, Block) for layer in layers):
        raise TypeError(
            f"apply_activation_checkpointing wraps the Blocks of model.layers, and {type(model).__name__} "
            "has none; pass a common.models.llama.Llama"
        )
    for name, layer in layers.named_children():
        if isinstance(layer, Block):
            layers.register_module(name, CheckpointedBlock(layer, mode))
    return model


# ----------------------------------------------------------------------------------------------------
# Measuring: what stays alive for backward, and which ops run
# ----------------------------------------------------------------------------------------------------


class _StorageTracker(TorchDispatchMode):
    """Remembers, by weak reference, every storage an op creates while the mode is on."""

    def __init__(self, exclude: set[int]) -> None:
        super().__init__()
        self.exclude = exclude  # storages (by address) that existed before: parameters, inputs
        self.storages: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.exclude:
                s = t.untyped_storage()
                ref = StorageWeakRef(s)
                # Keyed by the storage object's address, which the weak reference keeps from being reused
                # while it lives: a view or an in-place result rewrites its own storage's entry.
                self.storages[ref.cdata] = (ref, s.nbytes())
        return out

    def alive_bytes(self) -> int:
        return sum(nbytes for ref, nbytes in self.storages.values() if not ref.expired())


def saved_activation_bytes(model: nn.Module, tokens: torch.Tensor) -> int:
    """Bytes of the tensors created by model(tokens) that are still alive once it returns.

    With only the logits kept, everything else still alive is held for backward: the tensors autograd
    saved, and under selective checkpointing the matmul and attention outputs its policy caches (those
    live in the checkpoint's own storage, which torch.autograd.graph.saved_tensors_hooks never sees, which
    is why this counts live storages rather than packed tensors). Distinct storages are counted once, so
    views of one buffer cost one buffer; parameters, buffers and the input are not counted. The logits
    themselves are included (b * s * vocab elements).
    """
    exclude = {t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers(), tokens)}
    tracker = _StorageTracker(exclude)
    with tracker:
        logits = model(tokens)
    nbytes = tracker.alive_bytes()
    del logits
    return nbytes


class OpCounter(TorchDispatchMode):
    """Counts the aten ops that run inside `with OpCounter() as ops:`, backward included.

    ops.matmuls: the number of matmul calls (mm, addmm, bmm); ops.attention: attention kernel calls
    (forward only: their backward ops have other names). ops.counts: a Counter of every op by name.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.matmuls = 0
        self.attention = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        self.counts[str(func)] += 1
        self.matmuls += func in MATMUL_OPS
        self.attention += func in ATTENTION_OPS
        return func(*args, **(kwargs or {}))


# ----------------------------------------------------------------------------------------------------
# Benchmark: time and peak memory of a training step per mode
# ----------------------------------------------------------------------------------------------------


@dataclass
class CheckpointMeasurement:
    """One mode's training step: its timing (median step time in ms), peak memory and saved activations."""

    mode: str  # "none", "selective" or "full"
    step_ms: float
    peak_memory_bytes: int | None  # above what was allocated before the step (CUDA only; None on a CPU)
    saved_activation_bytes: int
    result: BenchResult


def measure_checkpointing(
    config: LlamaConfig,
    batch: int,
    seq_len: int,
    *,
    modes: tuple[str, ...] = ("none", "selective", "full"),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    **bench_kwargs: Any,
) -> dict[str, CheckpointMeasurement]:
    """Time a forward+backward step of a fresh Llama(config) for each mode, with common.bench.

    Every mode starts from the same seeded weights and tokens. On a CUDA device bench() reports the peak
    memory of the step above what the model occupied before it; on a CPU peak memory is None and
    saved_activation_bytes is the number to read. dtype: the model's parameter dtype (bfloat16 by default,
    as a GPU trains; pass torch.float32 on a CPU, where bf16 matmuls are slow). bench_kwargs go to
    common.bench.bench (warmup_ms, rep_ms, min_reps, ...).
    """
    for mode in modes:
        if mode != "none" and mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of 'none', {', '.join(repr(m) for m in MODES)}")
    device = (
        torch.device(device)
        if device is not None
        else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    inputs, targets = random_batch(config, batch, seq_len, seed=seed, device=device)
    results = {}
    for mode in modes:
        torch.manual_seed(seed)
        model = Llama(config).to(device=device, dtype=dtype)
        if mode != "none":
            apply_activation_checkpointing(model, mode)

        def step(model: nn.Module = model) -> None:
            model.loss(inputs, targets).backward()
            model.zero_grad(set_to_none=True)  # each step allocates its gradients afresh, as a real one does

        result = bench(step, name=f"checkpointing {mode}", device=device, **bench_kwargs)
        results[mode] = CheckpointMeasurement(
            mode=mode,
            step_ms=result.median_ms,
            peak_memory_bytes=result.peak_memory_bytes,
            saved_activation_bytes=saved_activation_bytes(model, inputs),
            result=result,
        )
        del model, step
    return results
