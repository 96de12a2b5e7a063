"""Public tests of `largemodels.tp_attention`: equal to the whole attention on one process.

The hidden tests check more head counts (grouped-query attention), 4 ranks, two groups side by side, both
Functions alone and errors for heads that do not split, and count your collectives: exactly one all-reduce in
forward and one in backward, on the group given.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from conftest import on_ranks
from largemodels.tp_attention import TensorParallelAttention

from common.models.llama import Attention, LlamaConfig, rope_tables

RANKS = 2
CONFIG = LlamaConfig(d_model=16, n_heads=4, n_kv_heads=2)  # head_dim 4; 2 query heads and 1 kv head per rank


def whole_attention() -> Attention:
    torch.manual_seed(0)
    return Attention(CONFIG).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, CONFIG.d_model, generator=generator, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=generator, dtype=torch.float64)


def rank_step() -> dict[str, torch.Tensor]:
    tp = TensorParallelAttention(whole_attention(), dist.group.WORLD)
    x, grad = data()
    x.requires_grad_(True)
    cos, sin = rope_tables(CONFIG.head_dim, x.shape[1])
    y = tp(x, cos, sin)
    y.backward(grad)
    return {"y": y.detach(), "dx": x.grad, "dwq": tp.wq.weight.grad, "dwo": tp.wo.weight.grad}


def test_equals_the_whole_attention() -> None:
    results = on_ranks(rank_step, RANKS)
    whole = whole_attention()
    x, grad = data()
    x.requires_grad_(True)
    cos, sin = rope_tables(CONFIG.head_dim, x.shape[1])
    y = whole(x, cos, sin)
    y.backward(grad)
    rows = CONFIG.n_heads // RANKS * CONFIG.head_dim  # of wq, per rank
    for rank in range(RANKS):
        ours = results[rank]
        torch.testing.assert_close(ours["y"], y.detach())
        torch.testing.assert_close(ours["dx"], x.grad)
        torch.testing.assert_close(ours["dwq"], whole.wq.weight.grad[rank * rows : (rank + 1) * rows])
        torch.testing.assert_close(ours["dwo"], whole.wo.weight.grad[:, rank * rows : (rank + 1) * rows])
