"""A pre-norm transformer block: the unit of work of every modern language model.

    block = TransformerBlock(d_model=1024, n_heads=16)
    y = block(x)                                  # x: (batch, seq, d_model) -> y: same shape

x + attention(norm(x)), then x + mlp(norm(x)), as in GPT-2 and Llama (with LayerNorm and GELU here).
Attention is torch's fused scaled_dot_product_attention, so the block's time is dominated by its six
matmuls (query/key/value/output projections and the two MLP layers), which is what mixed-precision
speedups act on. block_flops() counts those FLOPs, for TFLOP/s.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: causal multi-head self-attention and a GELU MLP, each with a residual."""

    def __init__(self, d_model: int, n_heads: int, *, mlp_ratio: int = 4, causal: bool = True) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads, self.causal = n_heads, causal
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)
        self.norm2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, mlp_ratio * d_model, bias=False)
        self.fc_out = nn.Linear(mlp_ratio * d_model, d_model, bias=False)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)  # 3 x (b, s, d)
        # (b, s, d) -> (b, heads, s, d / heads): SDPA attends over s for every (batch, head)
        q, k, v = (t.view(b, s, self.n_heads, d // self.n_heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (b, heads, s, d / heads)
        return self.proj(y.transpose(1, 2).reshape(b, s, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.fc_out(F.gelu(self.fc(self.norm2(x))))


def block_flops(
    batch: int, seq: int, d_model: int, *, mlp_ratio: int = 4, causal: bool = True, backward: bool = True
) -> float:
    """Matmul FLOPs of one TransformerBlock pass (forward, plus backward if asked); elementwise ops ignored.

    Per token: projections 2 * (3d^2 + d^2) + MLP 2 * 2 * mlp_ratio * d^2; attention scores and weighted sum
    2 * 2 * seq * d, halved when causal (fused kernels skip the masked half). Backward costs twice the
    forward (gradients with respect to both inputs and weights).
    """
    per_token = 2 * (4 + 2 * mlp_ratio) * d_model**2 + 4 * seq * d_model * (0.5 if causal else 1.0)
    forward = batch * seq * per_token
    return 3 * forward if backward else forward
