"""One matmul where a block reads the same input with several weights: q|k|v, and SwiGLU's gate|up.

    fuse_projections(model)                   # in place, before quantize_linears and before decoding
    decoder = GraphedDecoder(model, batch_size=1, max_len=512)

At batch 1 every projection is a matrix-vector product whose time is reading its weight. The week-5 Llama
keeps wq, wk, wv (and w1, w3) apart, because tensor parallelism shards each of them by heads; a decode
step then launches three kernels over one input vector, and k's and v's (4 times smaller than q's in
Llama-3-8B) are too short to stream at full bandwidth. Stacking the weights along their output channels
gives one longer matmul whose output splits back into the same q, k, v (gate, up) values: each output
channel is still its own row's dot product with x, and per-output-channel quantization scales (int8,
int4, fp8 per row) are the same as before. Only per-tensor scales (fp8-tensor) and SmoothQuant's smoothing
factors, which a merged layer computes over all its rows, differ from the separate layers'.

The decoder's attention (common.inference.kv_cache) calls `wqkv` once. Llama.forward still runs the merged
model, each of wq, wk, wv now computing the merged product and keeping its part: right, but slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.models.llama import Attention, FeedForward, Llama

__all__ = ["FusedFeedForward", "FusedQKV", "fuse_projections", "is_fused"]


def stack_linears(*linears: nn.Linear) -> nn.Linear:
    """One bias-free nn.Linear whose output is the linears' outputs side by side, on their device and dtype."""
    if any(linear.bias is not None for linear in linears):
        raise ValueError("stack_linears takes bias-free layers (the Llama's projections have no bias)")
    weight = torch.cat([linear.weight.detach() for linear in linears])  # (sum of out, in)
    stacked = nn.Linear(
        weight.shape[1], weight.shape[0], bias=False, device=weight.device, dtype=weight.dtype
    )
    stacked.weight.data.copy_(weight)
    return stacked


class FusedQKV(nn.Module):
    """wq, wk, wv as one layer: forward(x) -> (q, k, v), each (..., its own out_features)."""

    def __init__(self, wq: nn.Linear, wk: nn.Linear, wv: nn.Linear) -> None:
        super().__init__()
        self.linear = stack_linears(wq, wk, wv)  # a plain nn.Linear, so quantize_linears replaces it
        self.sizes = (wq.out_features, wk.out_features, wv.out_features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.linear(x).split(self.sizes, dim=-1)


class FusedFeedForward(nn.Module):
    """FeedForward (SwiGLU) with w1 and w3 as one layer: w2(silu(gate) * up), [gate | up] = w13(x)."""

    def __init__(self, feed_forward: FeedForward) -> None:
        super().__init__()
        self.w13 = stack_linears(feed_forward.w1, feed_forward.w3)
        self.w2 = feed_forward.w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.w2.in_features, dim=-1)  # d_ff each
        return self.w2(F.silu(gate) * up)


class _PartOf(nn.Module):
    """Stands where wq, wk or wv was: its part of the merged product, so that Llama.forward (and what runs
    it: calibration, error measurement) still works, at the price of computing the whole product three
    times. The decoder's attention calls wqkv once instead."""

    def __init__(self, fused: FusedQKV, index: int) -> None:
        super().__init__()
        # In a tuple: not registered as a submodule here too (it is attention.wqkv; its weights once)
        self.fused, self.index = (fused,), index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fused[0](x)[self.index]

    def extra_repr(self) -> str:
        return f"part {self.index} of wqkv"


def is_fused(attention: Attention) -> bool:
    """Whether fuse_projections has merged this attention's q, k and v projections."""
    return isinstance(getattr(attention, "wqkv", None), FusedQKV)


@torch.no_grad()
def fuse_projections(model: Llama) -> Llama:
    """Merge every block's wq|wk|wv into `attention.wqkv` and its feed-forward's w1|w3, in place; return model.

    Call it on a float model, before quantize_linears (which then quantizes each merged layer whole).
    """
    if not isinstance(model, Llama):
        raise TypeError(f"fuse_projections takes a common.models.llama.Llama, got {type(model).__name__}")
    for block in model.layers:
        attention = block.attention
        if is_fused(attention):
            raise ValueError("this model's projections are merged already")
        if not all(type(getattr(attention, name)) is nn.Linear for name in ("wq", "wk", "wv")):
            raise TypeError(
                "fuse_projections merges float nn.Linear layers: call it before quantize_linears, not after"
            )
        attention.wqkv = FusedQKV(attention.wq, attention.wk, attention.wv)
        for index, name in enumerate(("wq", "wk", "wv")):
            setattr(attention, name, _PartOf(attention.wqkv, index))
        block.feed_forward = FusedFeedForward(block.feed_forward)
    return model
