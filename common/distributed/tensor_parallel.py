"""Tensor parallelism, sequence parallelism and Ulysses attention, each applied to a plain Llama.

    apply_tensor_parallel(model)                          # Megatron-LM: heads, hidden units split over ranks
    apply_tensor_parallel(model, sequence_parallel=True)  # + norms and residual stream on sequence shards
    apply_tensor_parallel_dtensor(model, mesh)            # the same split, through torch's DTensor API
    logits = model(tokens)                                # every rank: the whole batch, the whole logits

    apply_ulysses(model); apply_ddp(model)                # DeepSpeed-Ulysses: a slice of the sequence each
    loss = model.loss(shard_sequence(tokens), shard_sequence(targets))

Data parallelism (ddp.py) copies the model; when the model, or one sequence's activations, no longer fit on
one GPU, the model's layers themselves have to be cut. What you will learn, top to bottom:

- Where a matmul can be cut (Shoeybi et al. 2019, "Megatron-LM"). Y = X A with A split by columns, A = [A_1
  ... A_p], gives each rank Y_r = X A_r from the whole X, with no communication; Z = Y B with B split by rows
  gives each rank a partial sum Y_r B_r, and Z is their sum: one all-reduce. A transformer's sublayers are
  exactly "column then row": q/k/v by heads then the output projection; the MLP's up/gate then its down
  projection. Nothing in between crosses ranks (attention runs per head; SwiGLU per hidden unit).
- Conjugate pairs. Entering such a region, X is replicated: its forward is free (f = identity), but each
  rank's region uses all of X for a part of the output, so each holds only a part of X's gradient, and
  backward must sum them (all-reduce). Leaving it, forward sums (g = all-reduce) and backward is free. Every
  collective below comes with its backward twin, spelled out as an autograd.Function.
- Sequence parallelism (Korthikanti et al. 2022). Between the regions (norms, residual adds), plain TP
  computes the same thing on every rank and keeps p copies of the activations. Split the sequence there
  instead, and g's all-reduce becomes a reduce-scatter (each rank keeps its slice of the sum), f an
  all-gather. An all-reduce is a reduce-scatter followed by an all-gather, so the bytes sent are the same:
  the activation memory between the regions is divided by p for free.
- Ulysses (Jacobs et al. 2023). Keep every weight whole, split only the sequence: everything but attention
  is per token anyway. Attention needs whole sequences, so q, k and v are exchanged with one all-to-all
  into "all positions, 1/p of the heads", attended, and exchanged back. Each rank sends 1/p of its
  activations, so the traffic per rank falls as p grows, where TP's stays the same.
- The cost, counted. `communication_volume` gives the collectives of one training step for each scheme,
  as messages that cost_model prices; the tests count what this module actually passes to the collectives.

Embeddings and the output layer stay replicated here (Megatron splits both by vocabulary, which also needs a
vocabulary-parallel cross-entropy; at our vocabulary sizes they are a small part of the model). Activations
are (batch, seq, d_model); Megatron keeps them (seq, batch, d_model) so that the sequence is dim 0, where
collectives concatenate, and so saves the transposes that `_all_gather_sequence` and friends pay for here.
"""

from __future__ import annotations

import contextlib
import inspect
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fnmatch import fnmatch
from functools import partial
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from common.distributed.cost_model import Cost, bus_bandwidth_factor, ring_cost
from common.errors import EffdlError
from common.models.llama import Attention, Block, FeedForward, Llama, LlamaConfig, count_parameters

__all__ = [
    "AllToAll",
    "Collective",
    "ColumnParallelLinear",
    "CopyToTensorParallel",
    "GatherSequence",
    "ParallelSizeError",
    "ReduceFromTensorParallel",
    "ReduceScatterSequence",
    "RowParallelLinear",
    "SplitSequence",
    "Scheme",
    "apply_tensor_parallel",
    "apply_tensor_parallel_dtensor",
    "apply_ulysses",
    "bytes_sent_per_rank",
    "communication_volume",
    "COUNTED_COLLECTIVES",
    "count_collectives",
    "full_gradients",
    "gather_shards",
    "shard_sequence",
    "tensor_parallel_plan",
]

Group = dist.ProcessGroup | None


class ParallelSizeError(EffdlError, ValueError):
    """A size (heads, hidden units, sequence length) that the ranks cannot split evenly."""


def _world(group: Group) -> int:
    return dist.get_world_size(group)


def _rank(group: Group) -> int:
    return dist.get_rank(group)


# ----------------------------------------------------------------------------------------------------
# 1. The conjugate pairs: each collective with the one its gradient needs
# ----------------------------------------------------------------------------------------------------


def _all_reduce(x: torch.Tensor, group: Group) -> torch.Tensor:
    """The sum of x over the group, in a new tensor (x may be used elsewhere in the graph)."""
    total = x.clone(memory_format=torch.contiguous_format)
    dist.all_reduce(total, group=group)
    return total


def _check_sequence(s: int, p: int) -> None:
    if s % p:
        raise ParallelSizeError(
            f"sequence length {s} is not divisible by the sequence-parallel size {p}; "
            f"pad or cut the sequences to a multiple of {p} tokens"
        )


def shard_sequence(x: torch.Tensor, group: Group = None) -> torch.Tensor:
    """This rank's slice of x along dim 1 (the sequence): rank r gets positions r*s/p ... (r+1)*s/p - 1."""
    p = _world(group)
    _check_sequence(x.shape[1], p)
    return x.tensor_split(p, dim=1)[_rank(group)].contiguous()  # (b, s/p, ...)


def _all_gather_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(b, s/p, d) on each rank -> (b, s, d), rank r's slice at positions r*s/p ..."""
    local = x.transpose(0, 1).contiguous()  # (s/p, b, d): the collectives concatenate along dim 0
    full = local.new_empty((_world(group) * local.shape[0], *local.shape[1:]))  # (s, b, d)
    dist.all_gather_into_tensor(full, local, group=group)
    return full.transpose(0, 1)  # (b, s, d)


def _reduce_scatter_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(b, s, d) partial sums on each rank -> (b, s/p, d): this rank's slice of their sum."""
    p = _world(group)
    _check_sequence(x.shape[1], p)
    full = x.transpose(0, 1).contiguous()  # (s, b, d)
    local = full.new_empty((full.shape[0] // p, *full.shape[1:]))  # (s/p, b, d)
    dist.reduce_scatter_tensor(local, full, group=group)
    return local.transpose(0, 1)  # (b, s/p, d)


class CopyToTensorParallel(torch.autograd.Function):
    """f: identity forward, all-reduce backward. Enters a tensor-parallel region with a replicated input.

    Each rank's part of the region reads all of x, so each rank's gradient of x covers only its part of the
    output: the whole gradient is their sum.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_reduce(grad, ctx.group), None


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: all-reduce forward, identity backward. Leaves the region: the output is the sum of the ranks' parts,
    and the gradient of a sum is the same gradient for every term."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class GatherSequence(torch.autograd.Function):
    """All-gather the sequence forward; backward, reduce-scatter or split, by who uses the gathered tensor.

    Sequence parallelism's f: the gathered (b, s, d) feeds a tensor-parallel region, so each rank's gradient
    of it is partial and backward reduce-scatters (sums, keeps this rank's slice). Before a replicated
    computation (the final norm and output layer), every rank's gradient is already whole and the same:
    backward only keeps this rank's slice (`grad_is_partial=False`; Megatron's tensor_parallel_output_grad).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group, grad_is_partial: bool) -> torch.Tensor:
        ctx.group, ctx.grad_is_partial = group, grad_is_partial
        return _all_gather_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        if ctx.grad_is_partial:
            return _reduce_scatter_sequence(grad, ctx.group), None, None
        return shard_sequence(grad, ctx.group), None, None


class ReduceScatterSequence(torch.autograd.Function):
    """Sequence parallelism's g: reduce-scatter forward (sum the partial outputs, keep this rank's slice of
    the sequence), all-gather backward (the region behind it needs the gradient of every position)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _reduce_scatter_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_sequence(grad, ctx.group), None


class SplitSequence(torch.autograd.Function):
    """Split forward (a replicated tensor -> this rank's slice), all-gather backward: where the residual
    stream leaves the replicated embedding for sequence shards, slice r's gradient lives on rank r only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return shard_sequence(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_gather_sequence(grad, ctx.group), None


def _sum_gradient_over(param: nn.Parameter, group: Group) -> None:
    """param is replicated but sees only this rank's tokens: sum its gradient over the ranks, as it arrives.

    A hook on the gradient (before accumulation into .grad), so gradient accumulation stays correct.
    """
    param.register_hook(partial(_all_reduce, group=group))


# ----------------------------------------------------------------------------------------------------
# 2. Column- and row-parallel linears, cut from a full nn.Linear
# ----------------------------------------------------------------------------------------------------


class ColumnParallelLinear(nn.Module):
    """Y_r = X A_r: this rank's block of the output features; X whole (replicated), Y split on its last dim.

    Built from the full nn.Linear (weight (out, in): output features are its rows), so a parallel model and
    its single-process original can come from one seed. No communication inside: f sits where the region
    begins (`tensor_parallel_plan`), once for wq, wk and wv together instead of once for each.
    """

    def __init__(self, linear: nn.Linear, group: Group = None) -> None:
        super().__init__()
        p, r = _world(group), _rank(group)
        if linear.out_features % p:
            raise ParallelSizeError(
                f"out_features={linear.out_features} is not divisible by the tensor-parallel size {p}"
            )
        self.in_features, self.out_features = linear.in_features, linear.out_features // p
        self.weight = nn.Parameter(linear.weight.detach().chunk(p, dim=0)[r].clone())  # (out/p, in)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().chunk(p)[r].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)  # (..., in) -> (..., out/p)


class RowParallelLinear(nn.Module):
    """Z = sum_r Y_r B_r: this rank's block of the input features; Y split along its last dim, Z summed.

    The sum is g: an all-reduce, or with sequence parallelism a reduce-scatter along the sequence. The bias
    is added once, after the sum (added on every rank before it, it would count p times).
    """

    def __init__(self, linear: nn.Linear, group: Group = None, *, sequence_parallel: bool = False) -> None:
        super().__init__()
        p, r = _world(group), _rank(group)
        if linear.in_features % p:
            raise ParallelSizeError(
                f"in_features={linear.in_features} is not divisible by the tensor-parallel size {p}"
            )
        self.group, self.sequence_parallel = group, sequence_parallel
        self.in_features, self.out_features = linear.in_features // p, linear.out_features
        self.weight = nn.Parameter(linear.weight.detach().chunk(p, dim=1)[r].clone())  # (out, in/p)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        if self.bias is not None and sequence_parallel:
            _sum_gradient_over(self.bias, group)  # added to this rank's slice of the sequence only

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        partial_sum = F.linear(y, self.weight)  # (..., in/p) -> (..., out): this rank's term of the sum
        if self.sequence_parallel:
            z = ReduceScatterSequence.apply(partial_sum, self.group)  # (b, s/p, out)
        else:
            z = ReduceFromTensorParallel.apply(partial_sum, self.group)  # (b, s, out)
        return z if self.bias is None else z + self.bias


# ----------------------------------------------------------------------------------------------------
# 3. The plan: one dict from layer name to how it is split
# ----------------------------------------------------------------------------------------------------

Style = Literal["enter", "colwise", "rowwise", "sequence_sharded", "split_sequence", "gather_sequence"]


def tensor_parallel_plan(sequence_parallel: bool = False) -> dict[str, Style]:
    """Llama's plan: module name (an fnmatch pattern, `*` any layer) -> style, as torchtitan writes its own.

    colwise/rowwise: replaced by ColumnParallelLinear/RowParallelLinear; enter: the input goes through f (or,
    with sequence parallelism, is all-gathered); sequence_sharded: runs on sequence slices, its weights'
    gradients summed; split_sequence/gather_sequence: output sliced / input gathered along the sequence.
    """
    plan: dict[str, Style] = {
        "layers.*.attention": "enter",  # f (or all-gather) once on the input of wq, wk, wv
        "layers.*.attention.wq": "colwise",  # heads r*h/p ... (r+1)*h/p - 1 on rank r
        "layers.*.attention.wk": "colwise",  # and their kv heads: the grouping stays within a rank
        "layers.*.attention.wv": "colwise",
        "layers.*.attention.wo": "rowwise",  # g (or reduce-scatter) on its output
        "layers.*.feed_forward": "enter",
        "layers.*.feed_forward.w1": "colwise",  # hidden units r*d_ff/p ... on rank r
        "layers.*.feed_forward.w3": "colwise",
        "layers.*.feed_forward.w2": "rowwise",
    }
    if sequence_parallel:
        plan |= {
            "tok_embeddings": "split_sequence",  # replicated embedding, then this rank's slice
            "layers.*.attention_norm": "sequence_sharded",
            "layers.*.ffn_norm": "sequence_sharded",
            "norm": "gather_sequence",  # the final norm and the output layer are replicated
        }
    return plan


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def _enter(model: nn.Module, name: str, group: Group, sequence_parallel: bool) -> None:
    """The region's first argument arrives replicated (f) or as sequence shards (all-gather)."""

    def hook(module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        if sequence_parallel:
            return (GatherSequence.apply(x, group, True), *rest)
        return (CopyToTensorParallel.apply(x, group), *rest)

    model.get_submodule(name).register_forward_pre_hook(hook)


def _split_output(model: nn.Module, name: str, group: Group, sequence_parallel: bool) -> None:
    """The module runs replicated on the whole sequence; its output continues as this rank's slice."""
    model.get_submodule(name).register_forward_hook(lambda module, args, out: SplitSequence.apply(out, group))


def _gather_input(model: nn.Module, name: str, group: Group, sequence_parallel: bool) -> None:
    """The module runs replicated on the whole sequence, gathered from the ranks' slices."""
    model.get_submodule(name).register_forward_pre_hook(
        lambda module, args: (GatherSequence.apply(args[0], group, False), *args[1:])
    )


def _sequence_sharded(model: nn.Module, name: str, group: Group, sequence_parallel: bool) -> None:
    """The module runs on this rank's slice of the sequence: its replicated weights' gradients are summed."""
    for param in model.get_submodule(name).parameters():
        _sum_gradient_over(param, group)


# Each style changes the named module of the model in place: (model, name, group, sequence_parallel).
_STYLES: dict[Style, Callable[[nn.Module, str, Group, bool], None]] = {
    "enter": _enter,
    "colwise": lambda model, name, group, sp: _replace(
        model, name, ColumnParallelLinear(model.get_submodule(name), group)
    ),
    "rowwise": lambda model, name, group, sp: _replace(
        model, name, RowParallelLinear(model.get_submodule(name), group, sequence_parallel=sp)
    ),
    "sequence_sharded": _sequence_sharded,
    "split_sequence": _split_output,
    "gather_sequence": _gather_input,
}


def _split_sizes(model: nn.Module, hidden_units: bool) -> list[tuple[str, str, int]]:
    """(module, size name, size) of every number of heads (and of hidden units) that the ranks will split."""
    sizes = []
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            sizes.append((name, "n_heads", module.wq.out_features // module.head_dim))
            sizes.append((name, "n_kv_heads", module.wk.out_features // module.head_dim))
        if isinstance(module, FeedForward) and hidden_units:
            sizes.append((name, "d_ff", module.w1.out_features))
    return sizes


def _check_divisible(sizes: list[tuple[str, str, int]], p: int, what: str) -> None:
    """Raise before anything changes (the model stays usable) if some size does not split over p ranks."""
    for module, size_name, size in sizes:
        if size % p:
            raise ParallelSizeError(
                f"{module}: {size_name}={size} is not divisible by the {what} size {p}; make "
                f"{size_name} a multiple of {p}, or use a {what} size that divides {size}"
            )


TENSOR_PARALLEL = "tensor-parallel"


def apply_tensor_parallel(model: Llama, group: Group = None, *, sequence_parallel: bool = False) -> Llama:
    """Split every block of model over the group's ranks (Megatron-LM), in place; returns model.

    Call it on every rank with the same model (same seed). Afterwards model(tokens) on every rank takes the
    whole batch and returns the whole logits; each rank holds 1/p of the attention and MLP weights and
    computes 1/p of their FLOPs. Each rank's gradients are those of its shards (`ColumnParallelLinear` and
    `RowParallelLinear` say which slice) and, for the replicated weights, whole and equal on every rank.
    With sequence_parallel=True, norms and residual adds run on 1/p of the sequence (its length must divide
    by p); the communication volume is the same (`communication_volume`).
    """
    if any(isinstance(module, ColumnParallelLinear | RowParallelLinear) for module in model.modules()):
        raise EffdlError("the model is tensor-parallel already; apply_tensor_parallel once, to a fresh model")
    _check_divisible(_split_sizes(model, hidden_units=True), _world(group), TENSOR_PARALLEL)
    for pattern, style in tensor_parallel_plan(sequence_parallel).items():
        names = [name for name, _ in model.named_modules() if fnmatch(name, pattern)]
        if not names:
            raise EffdlError(f"the plan's {pattern!r} matches no module of this model: is it a Llama?")
        for name in names:
            _STYLES[style](model, name, group, sequence_parallel)
    return model


# ----------------------------------------------------------------------------------------------------
# 4. The same, through PyTorch's own API (DTensor)
# ----------------------------------------------------------------------------------------------------


def apply_tensor_parallel_dtensor(
    model: Llama, mesh: DeviceMesh, *, sequence_parallel: bool = False
) -> Llama:
    """apply_tensor_parallel(model, sequence_parallel=...) with torch.distributed.tensor: torchtitan's plan.

    The weights become DTensors (Shard(0) for colwise, Shard(1) for rowwise), and their gradients too:
    `.full_tensor()` gathers one. `use_local_output=True` (the default) hands plain tensors back between the
    layers, so Attention's `view(b, s, -1, head_dim)` sees the local heads. Torch puts an f on the input of
    every colwise layer: 5 all-reduces a layer in backward (wq, wk, wv, w1, w3) where apply_tensor_parallel
    has 2, because it cannot know that the three share one input.

    With sequence parallelism, PrepareModuleInput is the all-gather into a region, RowwiseParallel's
    `output_layouts=Shard(1)` the reduce-scatter out of it, and SequenceParallel runs a norm on sequence
    shards, its weight replicated. The norm weights' gradients come out Partial(sum): DTensor defers their
    all-reduce until something reads them (the optimizer's step, or `.full_tensor()`). Unlike
    apply_tensor_parallel, torchtitan's plan also splits the embedding (by vocabulary rows: its partial
    outputs are reduce-scattered onto sequence shards) and the output layer (by vocabulary columns, the
    logits gathered back whole).
    """
    _check_divisible(_split_sizes(model, hidden_units=True), mesh.size(), TENSOR_PARALLEL)
    if sequence_parallel and model.config.use_kernels:
        raise EffdlError(
            "apply_tensor_parallel_dtensor(sequence_parallel=True) splits the output layer, but "
            "use_kernels=True computes the loss from output.weight directly, outside the layer's DTensor "
            "hooks; use apply_tensor_parallel(model, sequence_parallel=True), or a config with "
            "use_kernels=False"
        )
    if sequence_parallel and model.config.tie_embeddings:
        raise EffdlError(
            "apply_tensor_parallel_dtensor(sequence_parallel=True) splits the embedding by rows and the "
            "output layer by columns, each into a parameter of its own, which would untie tied embeddings; "
            "use apply_tensor_parallel(model, sequence_parallel=True), or a config with tie_embeddings=False"
        )
    sequence = Shard(1) if sequence_parallel else Replicate()  # where the residual stream lives
    plan: dict[str, ParallelStyle] = {
        "layers.*.attention.wq": ColwiseParallel(),
        "layers.*.attention.wk": ColwiseParallel(),
        "layers.*.attention.wv": ColwiseParallel(),
        "layers.*.attention.wo": RowwiseParallel(output_layouts=sequence),
        "layers.*.feed_forward.w1": ColwiseParallel(),
        "layers.*.feed_forward.w3": ColwiseParallel(),
        "layers.*.feed_forward.w2": RowwiseParallel(output_layouts=sequence),
    }
    if sequence_parallel:
        plan |= {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "layers.*.attention_norm": SequenceParallel(),
            "layers.*.attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None), desired_input_layouts=(Replicate(), None, None)
            ),
            "layers.*.ffn_norm": SequenceParallel(),
            "layers.*.feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            "norm": SequenceParallel(),
            "output": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
        }
    return parallelize_module(model, mesh, plan)


# ----------------------------------------------------------------------------------------------------
# 5. Ulysses: the whole model on sequence shards, attention by heads
# ----------------------------------------------------------------------------------------------------


class AllToAll(torch.autograd.Function):
    """Rank i's chunk j (along dim 0) goes to rank j, as its chunk i. Doing it twice gives back the input, so
    the backward of an all-to-all is the same all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Group) -> torch.Tensor:
        ctx.group = group
        return _all_to_all(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return _all_to_all(grad, ctx.group), None


def _all_to_all(x: torch.Tensor, group: Group) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def _sequence_to_heads(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(b, h, s/p, hd), this rank's positions -> (b, h/p, s, hd), this rank's heads."""
    p = _world(group)
    b, h, s_local, hd = x.shape
    chunks = x.reshape(b, p, h // p, s_local, hd).transpose(0, 1)  # (p, b, h/p, s/p, hd): chunk j to rank j
    received = AllToAll.apply(chunks, group)  # (p, b, h/p, s/p, hd): chunk i holds positions of rank i
    return received.permute(1, 2, 0, 3, 4).reshape(b, h // p, p * s_local, hd)


def _heads_to_sequence(x: torch.Tensor, group: Group) -> torch.Tensor:
    """(b, h/p, s, hd), this rank's heads -> (b, h, s/p, hd), this rank's positions."""
    p = _world(group)
    b, h_local, s, hd = x.shape
    # (b, h/p, s, hd) -> (p, b, h/p, s/p, hd): chunk j holds the positions of rank j
    chunks = x.reshape(b, h_local, p, s // p, hd).permute(2, 0, 1, 3, 4)
    received = AllToAll.apply(chunks, group)  # (p, b, h/p, s/p, hd): chunk i holds the heads of rank i
    return received.transpose(0, 1).reshape(b, p * h_local, s // p, hd)


def _ulysses_attend(
    attend: Callable[..., torch.Tensor], group: Group, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """Attention.attend on sequence shards: q (b, h, s/p, hd), k/v (b, kv, s/p, hd) -> (b, h, s/p, hd)."""
    q, k, v = (_sequence_to_heads(t, group) for t in (q, k, v))  # (b, heads/p, s, hd): whole sequences
    return _heads_to_sequence(attend(q, k, v), group)  # causal over all s positions, then back


def apply_ulysses(model: Llama, group: Group = None) -> Llama:
    """Make model run on one slice of the sequence per rank (DeepSpeed-Ulysses), in place; returns model.

    Each Attention.attend is overridden on its instance to exchange q, k, v by all-to-all; a hook on each
    Block gives it the rotary tables of this rank's positions (r*s/p ... (r+1)*s/p - 1) instead of the first
    s/p. The weights stay whole on every rank. What the training step must add:

        apply_ddp(model, group)   # each rank's gradients come from its tokens only: average them (DDP)
        loss = model.loss(shard_sequence(tokens, group), shard_sequence(targets, group))

    Each rank's loss is the mean over its s/p positions, so the average that DDP takes is the mean over all
    positions, the single-process loss (the shards are equal). Targets are shifted on the whole sequence
    before sharding. Every rank of the group sees the same sequences, each its own slice of them; that
    gradient all-reduce is the one data parallelism pays anyway, so Ulysses ranks are usually also the
    data-parallel (or ZeRO/FSDP) ranks, and the weights' memory is then sharded by those.
    """
    p, rank = _world(group), _rank(group)
    attends = [getattr(module, "attend", None) for module in model.modules() if isinstance(module, Attention)]
    if any(isinstance(attend, partial) and attend.func is _ulysses_attend for attend in attends):
        raise EffdlError("the model runs Ulysses attention already; apply_ulysses once, to a fresh model")
    # DeepSpeed repeats kv heads up to a multiple of p where there are fewer; that is not done here.
    _check_divisible(_split_sizes(model, hidden_units=False), p, "Ulysses")

    def positions_of_this_rank(block: nn.Module, args: tuple) -> tuple:
        x, _, _ = args  # (b, s/p, d), and cos/sin of positions 0 ... s/p - 1
        s_local = x.shape[1]
        start = rank * s_local
        if p * s_local > model.rope_cos.shape[0]:  # checked on every rank alike, so all of them raise
            raise ParallelSizeError(
                f"the whole sequence, {p} x {s_local} positions, exceeds max_seq_len="
                f"{model.rope_cos.shape[0]}; raise max_seq_len in the config"
            )
        return x, model.rope_cos[start : start + s_local], model.rope_sin[start : start + s_local]

    for module in model.modules():
        if isinstance(module, Attention):
            module.attend = partial(_ulysses_attend, module.attend, group)
        if isinstance(module, Block):
            module.register_forward_pre_hook(positions_of_this_rank)
    return model


# ----------------------------------------------------------------------------------------------------
# 6. What one training step sends
# ----------------------------------------------------------------------------------------------------

Scheme = Literal["tp", "tp_sp", "ulysses"]
CollectiveKind = Literal["all_reduce", "all_gather", "reduce_scatter", "all_to_all"]


@dataclass(frozen=True)
class Collective:
    """`calls` calls, in one training step, of a collective on messages of `nbytes` each.

    nbytes is the n of cost_model and nccl-tests: the whole tensor that is reduced or gathered (all-reduce,
    reduce-scatter: what each rank passes in; all-gather: what each rank gets out); for an all-to-all, what
    each rank passes in (and gets out).
    """

    kind: CollectiveKind
    nbytes: int
    calls: int
    where: str

    def cost(self, world: int) -> Cost:
        """One call's steps and bytes sent per rank, by the ring algorithms: Cost.time(link) prices it.

        All-reduce: ring_cost, 2(p-1)/p n. All-gather and reduce-scatter: half a ring, (p-1)/p n. All-to-all:
        p-1 exchanges, each sending the n/p that one other rank needs, (p-1)/p n in all.
        """
        if self.kind == "all_reduce":
            return ring_cost(self.nbytes, world)
        return Cost(world - 1, bus_bandwidth_factor(self.kind, world) * self.nbytes)


def communication_volume(
    scheme: Scheme, config: LlamaConfig, batch: int, seq_len: int, world: int, element_size: int = 4
) -> list[Collective]:
    """The collectives of one training step (forward and backward) of apply_tensor_parallel or apply_ulysses.

    With b = batch, s = seq_len, d = d_model, L = n_layers, B = element_size, p = world, and sent bytes per
    rank by the ring algorithms (`Collective.cost`):

    tp:      4L all-reduces of b s d B (g after wo and w2 forward, f before attention and MLP backward)
             -> sent per rank: 8L (p-1)/p b s d B. Whatever p, each rank sends the activations 8x a layer.
    tp_sp:   4L all-gathers and 4L reduce-scatters of b s d B in the blocks, +1 all-gather (embedding,
             backward) +1 (before the final norm, forward), 2L all-reduces of d B (norm weights' gradients)
             -> 8L (p-1)/p b s d B + 2 (p-1)/p b s d B + 4L (p-1)/p d B: the blocks send what tp sends.
    ulysses: per layer 4 all-to-alls of b s d B / p (q, attention output; forward and backward) and 4 of
             b s kv hd B / p (k, v), + 1 all-reduce of the P B bytes of the gradients (apply_ddp, in buckets
             whose sizes add up to P B)
             -> 4L (p-1)/p^2 b s (d + kv hd) B + 2 (p-1)/p P B: the activations' part falls as 1/p.

    P = the parameter count (embeddings, plus the output layer unless tied, plus L blocks, plus the final
    norm); kv = n_kv_heads, hd = head_dim. To price a step on a link of cost_model:

        sum(c.calls * c.cost(p).time(NVLINK_H100) for c in communication_volume("tp", config, b, s, p, 2))
    """
    b, s, d, L, B, p = batch, seq_len, config.d_model, config.n_layers, element_size, world
    activations = b * s * d * B
    if scheme == "tp":
        return [Collective("all_reduce", activations, 4 * L, "g after wo, w2 (forward); f (backward)")]
    if scheme == "tp_sp":
        return [
            Collective("all_gather", activations, 4 * L + 2, "before attention, MLP, final norm; embedding"),
            Collective("reduce_scatter", activations, 4 * L, "after wo, w2; attention, MLP (backward)"),
            Collective("all_reduce", d * B, 2 * L, "gradients of the norms' weights"),
        ]
    if scheme == "ulysses":
        kv_dim = config.n_kv_heads * config.head_dim
        return [
            Collective("all_to_all", activations // p, 4 * L, "q and the attention output, both ways"),
            Collective("all_to_all", b * s * kv_dim * B // p, 4 * L, "k and v, both ways"),
            Collective("all_reduce", count_parameters(config) * B, 1, "gradients (apply_ddp)"),
        ]
    raise ValueError(f"scheme must be 'tp', 'tp_sp' or 'ulysses', got {scheme!r}")


def bytes_sent_per_rank(collectives: list[Collective], world: int) -> float:
    """Bytes each rank sends in one training step: the sum of calls x bytes of `Collective.cost`."""
    return sum(c.calls * c.cost(world).bytes for c in collectives)


# ----------------------------------------------------------------------------------------------------
# Checking a parallel model: its gradients at full shape, and the collectives a rank really calls
# ----------------------------------------------------------------------------------------------------

# The torch.distributed collectives the schemes call -> (the kind communication_volume names, the parameter
# that is the message whose size it counts).
COUNTED_COLLECTIVES: dict[str, tuple[CollectiveKind, str]] = {
    "all_reduce": ("all_reduce", "tensor"),
    "all_gather_into_tensor": ("all_gather", "output_tensor"),  # the gathered output
    "reduce_scatter_tensor": ("reduce_scatter", "input"),  # the input that is reduced
    "all_to_all_single": ("all_to_all", "input"),  # what this rank passes in
}


@contextlib.contextmanager
def count_collectives() -> Iterator[Counter]:
    """Count (kind, message bytes) of every call of the collectives above on this rank, while inside.

    The functions of torch.distributed are replaced for the duration, so the schemes' own calls are counted
    (DTensor's functional collectives go another way and are not), whether they pass the message by position
    or by name (FSDP2 passes `output=`). Compare with communication_volume.
    """
    counts: Counter = Counter()
    originals = {name: getattr(dist, name) for name in COUNTED_COLLECTIVES}
    signatures = {name: inspect.signature(original) for name, original in originals.items()}

    def counting(name: str, *args: object, **kwargs: object) -> object:
        kind, parameter = COUNTED_COLLECTIVES[name]
        message = signatures[name].bind(*args, **kwargs).arguments[parameter]
        assert isinstance(message, torch.Tensor)
        counts[(kind, message.numel() * message.element_size())] += 1
        return originals[name](*args, **kwargs)

    for name in COUNTED_COLLECTIVES:
        setattr(dist, name, partial(counting, name))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def gather_shards(t: torch.Tensor, dim: int, group: Group = None) -> torch.Tensor:
    """The whole tensor on every rank: each rank's shard t, concatenated in rank order along dim."""
    parts = [torch.empty_like(t) for _ in range(_world(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def full_gradients(model: nn.Module, group: Group = None) -> dict[str, torch.Tensor]:
    """Every parameter's gradient at its full shape, by name, on every rank (a collective: all ranks call it).

    Shards are gathered: a ColumnParallelLinear's rank r holds output features r*out/p.., a
    RowParallelLinear's weight input features r*in/p..; a DTensor gradient is made whole. Other gradients
    are returned as they are. The result compares name by name with the single-process model's gradients.
    """
    grads = {}
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            grad = param.grad
            if isinstance(grad, DTensor):
                grad = grad.full_tensor()
            elif isinstance(module, ColumnParallelLinear):
                grad = gather_shards(grad, 0, group)
            elif isinstance(module, RowParallelLinear) and name == "weight":
                grad = gather_shards(grad, 1, group)
            grads[f"{module_name}.{name}" if module_name else name] = grad
    return grads
