"""Tensor-parallel attention: each rank computes the attention of its own heads (Megatron-LM).

Attention is y = wo(attend(wq x, wk x, wv x)), and the attention itself runs per head: head h needs only rows
h * hd ... (h + 1) * hd - 1 of wq, wk and wv (its q, k, v) and the same columns of wo. Split the heads over p
ranks and each rank holds 1/p of the four weights:

    rank r:   q, k, v = x wq_r^T, x wk_r^T, x wv_r^T      # its heads only: "column parallel", no communication
              partial_r = attend(q, k, v) wo_r^T          # its columns of wo: "row parallel", a partial sum
              y = sum over r of partial_r                 # one all-reduce

Every rank starts from the whole x (replicated) and ends with the whole y (replicated). Two conjugate
operators mark the region between:

- f, entering (`CopyToTensorParallel`): forward is the identity. Each rank uses all of x for its own heads, so
  x's gradient is the sum of the ranks' contributions: backward all-reduces.
- g, leaving (`ReduceFromTensorParallel`): forward all-reduces the partial sums. y is replicated, so every rank
  receives the same gradient of y, and that is the gradient of each partial sum: backward is the identity.

Grouped-query attention: with n_heads query heads and n_kv_heads kv heads, kv head j serves the query heads
j * g ... j * g + g - 1 (g = n_heads // n_kv_heads; `common.models.llama.Attention.attend`). Rank r keeps the
query heads r * n_heads / p ... and the kv heads r * n_kv_heads / p ..., which are exactly the kv heads its
query heads need, so both counts must be divisible by p.

Not allowed here: `common.distributed.tensor_parallel` and `torch.distributed.tensor` (DTensor); the grader
refuses to import them. Write the communication yourself with `torch.distributed`.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from common.models.llama import Attention


class CopyToTensorParallel(torch.autograd.Function):
    """f: identity in forward; all-reduce (sum) of the gradient over `group` in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """Return x unchanged (a new view of it is fine); no communication. Remember `group` for backward."""
        # BEGIN SOLUTION: CopyToTensorParallel.forward: remember the group, return x (a view)
        ctx.group = group
        return x.view_as(x)
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The sum over the ranks of `group` of their gradients: exactly one all-reduce. (grad, None)."""
        # BEGIN SOLUTION: CopyToTensorParallel.backward: all-reduce a copy of the gradient on the group
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
        # END SOLUTION


class ReduceFromTensorParallel(torch.autograd.Function):
    """g: all-reduce (sum) over `group` in forward; identity in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
        """The sum over the ranks of `group` of their x: exactly one all-reduce. Do not change x in place."""
        # BEGIN SOLUTION: ReduceFromTensorParallel.forward: all-reduce a copy of x on the group
        total = x.contiguous().clone()
        dist.all_reduce(total, group=group)
        return total
        # END SOLUTION

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        """The gradient unchanged (it is the same on every rank); no communication. (grad, None)."""
        # BEGIN SOLUTION: ReduceFromTensorParallel.backward: pass the gradient through
        return grad, None
        # END SOLUTION


class TensorParallelAttention(nn.Module):
    """This rank's heads of a `common.models.llama.Attention`: the same forward, split over `group`'s ranks.

    Attributes: `wq`, `wk`, `wv`, `wo` (nn.Linear without bias, of `attention`'s dtype), `head_dim`, `group`.
    """

    def __init__(self, attention: Attention, group: dist.ProcessGroup | None = None) -> None:
        """Keep the shard of `attention`'s weights that rank r = dist.get_rank(group) of p ranks computes with.

        - wq: rows of query heads r * n_heads / p ... (r + 1) * n_heads / p - 1, so weight (n_heads / p * hd,
          d_model); wk, wv: rows of kv heads r * n_kv_heads / p ..., weight (n_kv_heads / p * hd, d_model);
          wo: the same columns as wq's rows, weight (d_model, n_heads / p * hd).
        - n_heads = wq's rows // head_dim, n_kv_heads = wk's rows // head_dim (head_dim: `attention.head_dim`).
        - Copies: a later change to `attention`'s weights does not change these, nor the other way round.
        - Raise ValueError, naming the counts, if n_heads or n_kv_heads is not divisible by p.
        No communication.
        """
        super().__init__()
        # BEGIN SOLUTION: TensorParallelAttention.__init__: check divisibility, copy this rank's rows of wq/wk/wv and columns of wo
        self.group = group
        self.head_dim = hd = attention.head_dim
        p, r = dist.get_world_size(group), dist.get_rank(group)
        n_heads, n_kv_heads = attention.wq.out_features // hd, attention.wk.out_features // hd
        if n_heads % p or n_kv_heads % p:
            raise ValueError(
                f"tensor parallelism over {p} ranks needs n_heads ({n_heads}) and n_kv_heads ({n_kv_heads}) "
                f"divisible by {p}"
            )
        q_rows = slice(r * n_heads // p * hd, (r + 1) * n_heads // p * hd)
        kv_rows = slice(r * n_kv_heads // p * hd, (r + 1) * n_kv_heads // p * hd)
        shards = {
            "wq": attention.wq.weight[q_rows],
            "wk": attention.wk.weight[kv_rows],
            "wv": attention.wv.weight[kv_rows],
            "wo": attention.wo.weight[:, q_rows],
        }
        for name, weight in shards.items():
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
            setattr(self, name, linear)
        # END SOLUTION

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention.forward(x, cos, sin) of the whole module, on every rank: x (b, s, d_model), the same on
        every rank of the group; cos, sin (s, head_dim // 2) as `rope_tables` gives them. Returns (b, s,
        d_model), the same on every rank. Exactly one all-reduce in forward (on the group, the output) and,
        when x needs a gradient, exactly one in backward (x's gradient), through the two Functions above.
        Rotary embeddings and causal attention as in `common.models.llama` (`apply_rotary`, `sdpa_causal`,
        kv heads repeated with `repeat_interleave` for grouped-query attention).
        """
        # BEGIN SOLUTION: TensorParallelAttention.forward: f, this rank's heads of Attention.forward, g
        from common.models.llama import apply_rotary, sdpa_causal

        b, s, _ = x.shape
        x = CopyToTensorParallel.apply(x, self.group)
        q = apply_rotary(self.wq(x).view(b, s, -1, self.head_dim), cos, sin).transpose(1, 2)
        k = apply_rotary(self.wk(x).view(b, s, -1, self.head_dim), cos, sin).transpose(1, 2)
        v = self.wv(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        group_size = q.shape[1] // k.shape[1]
        if group_size > 1:
            k, v = k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)
        y = sdpa_causal(q, k, v).transpose(1, 2).reshape(b, s, -1)
        return ReduceFromTensorParallel.apply(self.wo(y), self.group)
        # END SOLUTION
