"""Public tests of `largemodels.tp_attention`: equal to the whole attention on one process.

The ranks run on the grader's own process group, as in the hidden tests. The hidden tests check more head counts (one kv head per query head, multi-query, float32), 4 ranks, two
groups side by side, both Functions alone and errors for heads that do not split; they give each rank weights
whose rows and columns of other ranks are NaN, and count your collectives: exactly one all-reduce in forward
and one in backward, on the group given.
"""

from __future__ import annotations

import torch
from conftest import on_hub

from common.models.llama import Attention, LlamaConfig, rope_tables

RANKS = 4
CONFIG = LlamaConfig(d_model=16, n_heads=4, n_kv_heads=2)  # head_dim 4; 1 query head per rank, kv heads on 2


def fused(whole: Attention) -> torch.Tensor:
    """wqkv in the fused layout: per kv head j, q of its query heads, then k of j, then v of j."""
    hd, g = CONFIG.head_dim, CONFIG.n_heads // CONFIG.n_kv_heads
    blocks = []
    for j in range(CONFIG.n_kv_heads):
        blocks += [whole.wq.weight[j * g * hd : (j + 1) * g * hd], whole.wk.weight[j * hd : (j + 1) * hd]]
        blocks.append(whole.wv.weight[j * hd : (j + 1) * hd])
    return torch.cat(blocks).detach()


def whole_attention() -> Attention:
    torch.manual_seed(0)
    return Attention(CONFIG).double()


def data() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, CONFIG.d_model, generator=generator, dtype=torch.float64)
    return x, torch.randn(x.shape, generator=generator, dtype=torch.float64)


def rank_step() -> dict[str, torch.Tensor]:
    from largemodels.tp_attention import TensorParallelAttention  # in the rank only, not in this process

    whole = whole_attention()
    tp = TensorParallelAttention(fused(whole), whole.wo.weight.detach(), CONFIG.n_heads, CONFIG.n_kv_heads)
    x, grad = data()
    x.requires_grad_(True)
    cos, sin = rope_tables(CONFIG.head_dim, x.shape[1])
    y = tp(x, cos, sin)
    y.backward(grad.clone())
    return {"y": y.detach(), "dx": x.grad, "dwqkv": tp.wqkv.weight.grad, "dwo": tp.wo.weight.grad}


def rows_of_ranks_1_and_2() -> list[list[int]]:
    from largemodels.tp_attention import shard_rows

    return [shard_rows(4, 2, 2, 1, 4).tolist(), shard_rows(4, 2, 2, 2, 4).tolist()]


def test_shard_rows_of_a_replicated_kv_head() -> None:
    # 4 query heads, 2 kv heads, head_dim 2: groups [q0 q1 k0 v0][q2 q3 k1 v1], rows 0-7 and 8-15; 4 ranks
    one, two = on_hub(rows_of_ranks_1_and_2, 1, module="largemodels.tp_attention")[0]
    assert one == [2, 3, 4, 5, 6, 7]  # q1, then k0 and v0 (kept on rank 0 too)
    assert two == [8, 9, 12, 13, 14, 15]  # q2, k1, v1


def test_equals_the_whole_attention() -> None:
    results = on_hub(rank_step, RANKS, module="largemodels.tp_attention")
    whole = whole_attention()
    x, grad = data()
    x.requires_grad_(True)
    cos, sin = rope_tables(CONFIG.head_dim, x.shape[1])
    y = whole(x, cos, sin)
    y.backward(grad)
    hd = CONFIG.head_dim
    for rank in range(RANKS):
        ours = results[rank]
        torch.testing.assert_close(ours["y"], y.detach())
        torch.testing.assert_close(ours["dx"], x.grad)
        torch.testing.assert_close(ours["dwqkv"][:hd], whole.wq.weight.grad[rank * hd : (rank + 1) * hd])
        torch.testing.assert_close(ours["dwo"], whole.wo.weight.grad[:, rank * hd : (rank + 1) * hd])
    # kv head j is kept on ranks 2j and 2j + 1: each holds the part of its gradient from its own query head
    for j in range(CONFIG.n_kv_heads):
        dk = results[2 * j]["dwqkv"][hd : 2 * hd] + results[2 * j + 1]["dwqkv"][hd : 2 * hd]
        torch.testing.assert_close(dk, whole.wk.weight.grad[j * hd : (j + 1) * hd])
