"""Public tests of `largemodels.ulysses`: equal to causal attention over the whole sequence on one process.

The ranks run on the grader's own process group (the hub of `common.grading.ranks`), as the hidden tests do:
gloo has no `all_to_all` with tensor lists. The hidden tests check grouped-query heads, 4 ranks, two groups
side by side, fewer kv heads than ranks, each exchange alone and errors for heads that do not split, and
count your collectives:
all_to_all only, 4 in forward and 4 in backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import on_hub

RANKS = 2


def data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    shape = (2, 6, 4, 4)  # (batch, sequence, heads, head_dim)
    return {
        name: torch.randn(shape, generator=generator, dtype=torch.float64) for name in ("q", "k", "v", "grad")
    }


def rank_step() -> dict[str, torch.Tensor]:
    from largemodels.ulysses import (
        ulysses_attention,
    )  # in the rank only: the hub's process must not import it

    rank = dist.get_rank()
    q, k, v, grad = (t.chunk(RANKS, dim=1)[rank].clone() for t in data().values())
    for t in (q, k, v):
        t.requires_grad_(True)
    out = ulysses_attention(q, k, v)
    out.backward(grad)
    return {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}


def test_equals_attention_on_the_whole_sequence() -> None:
    results = on_hub(rank_step, RANKS, module="largemodels.ulysses")
    whole = data()
    q, k, v = (whole[name].requires_grad_(True) for name in ("q", "k", "v"))
    out = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True).transpose(
        1, 2
    )
    out.backward(whole["grad"])
    expected = {"out": out.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad}
    for key, value in expected.items():
        ours = torch.cat([results[rank][key] for rank in range(RANKS)], dim=1)
        torch.testing.assert_close(ours, value, msg=key)
