"""A Llama-style decoder (week 5): the model that the parallelism and memory techniques are applied to.

    config = LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2)
    model = Llama(config)
    logits = model(tokens)                  # tokens (batch, seq) long -> logits (batch, seq, vocab)
    loss = model.loss(tokens, targets)      # scalar mean cross-entropy

What you will learn, reading top to bottom: what Llama changed in the GPT-2 block and why each change is
cheap. RMSNorm instead of LayerNorm (no mean subtracted, no bias: one reduction per row); rotary position embeddings
(positions enter as a rotation of queries and keys, so scores depend on relative distance only, and no
position table is learned); grouped-query attention (several query heads share one key/value head, which
shrinks the KV cache and the k/v projections); and the SwiGLU feed-forward (a gated MLP with three
matrices, its hidden size d_ff about 8/3 d_model so the parameter count matches a 4x GELU MLP).

The model knows nothing about distribution: tensor parallelism shards wq/wk/wv/wo and w1/w2/w3 by heads and
columns from the outside (the attention reads its local number of heads from the projections' outputs), and
sequence-parallel attention replaces `Attention.attend` on an instance. `use_kernels=True` swaps RMSNorm,
attention and the loss for the course's Triton kernels (common.kernels), chosen once in `__init__`.

Named sizes, `LlamaConfig.preset(name)`; parameters as counted by `count_parameters` (a test checks this
table), training FLOPs per token from `training_flops` at sequence length 2048:

| preset | d_model | layers | heads (kv) | d_ff | vocab | tied | parameters | training GFLOP/token |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| toy | 64 | 2 | 4 (2) | 176 | 256 | no | 125,248 | - |
| 125m | 768 | 12 | 12 (4) | 2048 | 32000 | no | 124,668,672 | 0.71 |
| 350m | 1024 | 24 | 16 (8) | 2816 | 32000 | no | 348,701,696 | 2.20 |
| 1b | 2048 | 16 | 32 (8) | 8192 | 32000 | yes | 1,038,682,112 | 6.63 |
| 8b | 4096 | 32 | 32 (8) | 14336 | 32000 | no | 7,241,732,096 | 44.27 |

"1b" is Llama-3.2-1B's shape with a 32000-token vocabulary; with its own 128256 tokens the same shape has
1,235,814,400 parameters, Llama-3.2-1B's published count. "8b" is Llama-3-8B's shape, likewise with 32000
tokens (with its 128256: 8,030,261,248, the published count); its matrices are the size at which decoding
one sequence is a stream of weights, and the week-9 quantization benchmark decodes a few of its layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Head sizes common.kernels.flash_attention is tuned for (its HEAD_DIMS; a test checks they agree): written
# here so that a config can be checked without importing common.kernels, which switches on Triton's
# interpreter on a machine without a GPU.
KERNEL_HEAD_DIMS = (64, 128)

# ----------------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------------


@dataclass
class LlamaConfig:
    """Shape of a Llama-style decoder; `head_dim = d_model // n_heads`."""

    vocab_size: int = 256
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2  # grouped-query attention: each kv head serves n_heads // n_kv_heads query heads
    d_ff: int = 176  # SwiGLU hidden size
    max_seq_len: int = 128  # length of the rotary tables
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False  # output.weight is tok_embeddings.weight
    use_kernels: bool = False  # RMSNorm, attention and the loss through common.kernels (Triton)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads:
            raise ValueError(
                f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                f"pick n_heads among the divisors of d_model (head_dim = d_model // n_heads)"
            )
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; each kv head "
                f"serves a whole group of query heads: pick n_kv_heads among the divisors of n_heads"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = d_model // n_heads = {self.head_dim} is odd; rotary embeddings rotate pairs of "
                f"numbers, so head_dim must be even: change d_model={self.d_model} or n_heads={self.n_heads}"
            )
        if self.use_kernels and self.head_dim not in KERNEL_HEAD_DIMS:
            raise ValueError(
                f"use_kernels=True needs head_dim in {KERNEL_HEAD_DIMS} (the flash-attention kernel's sizes), "
                f"got d_model // n_heads = {self.d_model} // {self.n_heads} = {self.head_dim}: change n_heads, "
                "or set use_kernels=False"
            )
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(
                f"rope_theta={self.rope_theta} and norm_eps={self.norm_eps} must both be positive"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @classmethod
    def preset(cls, name: str, **changes: object) -> LlamaConfig:
        """A named size from PRESETS (see the module docstring's table), with optional field changes."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **changes})


# Named sizes. Apart from the toy and 8b: head dim 64 (a size of the flash-attention kernel); vocabulary 32000
# (Llama 2's tokenizer); d_ff about 8/3 d_model rounded up to a multiple of 256, as Llama does.
PRESETS: dict[str, dict] = {
    "toy": {},
    "125m": dict(
        vocab_size=32000, d_model=768, n_layers=12, n_heads=12, n_kv_heads=4, d_ff=2048, max_seq_len=2048
    ),
    "350m": dict(
        vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, d_ff=2816, max_seq_len=2048
    ),
    # Llama-3.2-1B's shape (16 layers, width 2048, 32 query and 8 kv heads, SwiGLU 8192, tied embeddings,
    # theta 500000) with a 32000-token vocabulary instead of its 128256.
    "1b": dict(
        vocab_size=32000,
        d_model=2048,
        n_layers=16,
        n_heads=32,
        n_kv_heads=8,
        d_ff=8192,
        max_seq_len=2048,
        rope_theta=500000.0,
        tie_embeddings=True,
    ),
    # Llama-3-8B's shape (32 layers, width 4096, 32 query and 8 kv heads: head dim 128, SwiGLU 14336,
    # untied embeddings, theta 500000) with a 32000-token vocabulary instead of its 128256.
    "8b": dict(
        vocab_size=32000,
        d_model=4096,
        n_layers=32,
        n_heads=32,
        n_kv_heads=8,
        d_ff=14336,
        max_seq_len=2048,
        rope_theta=500000.0,
    ),
}


def layer_matmul_parameters(config: LlamaConfig) -> int:
    """Weights of one block's matmuls: wq, wo (d x n_heads head_dim), wk, wv (d x n_kv_heads head_dim), SwiGLU."""
    d, attn, kv = config.d_model, config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    return 2 * d * attn + 2 * d * kv + 3 * d * config.d_ff


def count_parameters(config: LlamaConfig) -> int:
    """The number of parameters of Llama(config), from the shapes alone (a tied matrix counted once)."""
    d = config.d_model
    per_layer = layer_matmul_parameters(config) + 2 * d  # + attention_norm and ffn_norm weights
    embeddings = config.vocab_size * d * (1 if config.tie_embeddings else 2)  # tok_embeddings (+ output)
    return embeddings + config.n_layers * per_layer + d  # + the final norm


def training_flops(config: LlamaConfig, n_tokens: int, seq_len: int, *, causal: bool = True) -> float:
    """FLOPs of training on n_tokens tokens in sequences of seq_len: forward and backward, matmuls only.

        training_flops = 6 N D + 6 L s (n_heads head_dim) D          (causal; 12 L s ... when not causal)

    N is the number of parameters that multiply: the blocks' matmul weights and the output projection
    (counted even when tied to the embedding, since its matmul runs), not the embedding lookup (an index)
    nor the norms' weights (elementwise); D = n_tokens. A forward pass costs 2 N FLOPs per token (a
    multiply and an add per weight), the backward twice that (gradients for inputs and for weights): 6 N D.
    Attention: per token, per layer and query head, the scores q K^T and the weighted sum P V are each
    2 s head_dim FLOPs: 4 L s (n_heads head_dim) forward, times 3 for training. A causal kernel that skips
    the masked half (as FlashAttention does) does half of it: 6 L s (n_heads head_dim) per token. PyTorch's
    math backend computes the whole s x s square and does the non-causal amount.
    Not counted: norms, rotary, softmax, SwiGLU's product, the loss (O(D d) or O(D V) each, not O(D N)).
    """
    matmul_params = config.n_layers * layer_matmul_parameters(config) + config.vocab_size * config.d_model
    attention_heads = config.n_heads * config.head_dim
    attention_per_token = 3 * 4 * config.n_layers * seq_len * attention_heads * (0.5 if causal else 1.0)
    return float(6 * matmul_params * n_tokens + attention_per_token * n_tokens)


# ----------------------------------------------------------------------------------------------------
# RMSNorm and rotary position embeddings
# ----------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim, the statistics in fp32 (as Llama does)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class KernelRMSNorm(RMSNorm):
    """RMSNorm through the fused Triton kernel of common.kernels.norms (same parameters, same result)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The kernels are imported where they are used, not at the top: importing common.kernels switches
        # on Triton's interpreter on a machine without a GPU, which a plain model should not do.
        from common.kernels.norms import rms_norm

        return rms_norm(x, self.weight.to(x.dtype), self.eps)


def rope_tables(head_dim: int, max_seq_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles, each (max_seq_len, head_dim // 2), fp32.

    Pair i of a head (numbers 2i and 2i+1) at position p is rotated by the angle p * theta^(-2i / head_dim):
    fast rotations for the first pairs, slow ones for the last, like the sinusoids of the original
    transformer. A query at p and a key at p' then score q R(p)^T R(p') k = q R(p' - p) k: relative position.
    """
    freqs = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (head_dim // 2,)
    positions = torch.arange(max_seq_len, dtype=torch.float64)
    angles = torch.outer(positions, freqs)  # (max_seq_len, head_dim // 2)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x[2i], x[2i+1]) of every head by its angle; x (batch, seq, heads, head_dim).

    cos/sin (seq, head_dim // 2) for the positions of x. The same as multiplying the complex numbers
    x[2i] + j x[2i+1] by exp(j angle), as Meta's reference does with torch.view_as_complex.
    """
    cos = cos.to(x.dtype)[:, None, :]  # (seq, 1, head_dim // 2): broadcast over batch and heads
    sin = sin.to(x.dtype)[:, None, :]
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (batch, seq, heads, head_dim // 2) each: the pairs' two halves
    rotated = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., head_dim // 2, 2)
    return rotated.flatten(-2)  # (batch, seq, heads, head_dim), pairs back in place


# ----------------------------------------------------------------------------------------------------
# Attention, feed-forward, block
# ----------------------------------------------------------------------------------------------------


def sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention through torch's scaled_dot_product_attention; q, k, v (b, heads, s, head_dim)."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def flash_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention through the course's FlashAttention kernel; q, k, v (b, heads, s, head_dim)."""
    from common.kernels.flash_attention import flash_attention

    return flash_attention(q, k, v, causal=True)


class Attention(nn.Module):
    """Causal self-attention with rotary embeddings and grouped-query heads, no biases."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.d_model, config.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(config.d_model, config.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * self.head_dim, config.d_model, bias=False)
        # The attention itself, for heads of equal number: the kernel takes no grouped-query heads, so
        # attend() repeats k and v before calling either implementation.
        self.causal_attention = flash_causal if config.use_kernels else sdpa_causal

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        # (b, s, heads * head_dim) -> (b, s, heads, head_dim); heads read from the weights, so a
        # tensor-parallel shard of wq/wk/wv (a subset of heads) needs no change here
        q = self.wq(x).view(b, s, -1, self.head_dim)
        k = self.wk(x).view(b, s, -1, self.head_dim)
        v = self.wv(x).view(b, s, -1, self.head_dim)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # (b, s, heads, head_dim) -> (b, heads, s, head_dim): attention runs over s for each (batch, head)
        y = self.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))  # (b, n_q_heads, s, hd)
        return self.wo(y.transpose(1, 2).reshape(b, s, -1))  # (b, s, n_q_heads * head_dim) -> (b, s, d)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Causal attention; q (b, n_q_heads, s, hd), k/v (b, n_kv_heads, s, hd) -> (b, n_q_heads, s, hd).

        Grouped-query: kv head j serves query heads j*g ... j*g + g - 1 (g = n_q_heads // n_kv_heads), so
        k and v are repeated g times along the heads, each copy next to its original (repeat_interleave).
        """
        group = q.shape[1] // k.shape[1]
        if group > 1:
            k = k.repeat_interleave(group, dim=1)  # (b, n_q_heads, s, hd)
            v = v.repeat_interleave(group, dim=1)
        return self.causal_attention(q, k, v)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x); w1 is the gate, w3 the up projection, w2 the down projection."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w3 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.w2 = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + feed_forward(norm(x))."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        norm = KernelRMSNorm if config.use_kernels else RMSNorm
        self.attention_norm = norm(config.d_model, config.norm_eps)
        self.attention = Attention(config)
        self.ffn_norm = norm(config.d_model, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin)
        return x + self.feed_forward(self.ffn_norm(x))


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------


def eager_loss(output: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of output(hidden); hidden (b, s, d_model), targets (b, s). Logits in fp32."""
    logits = output(hidden).float()  # (b, s, vocab)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())  # over (b * s) rows


def kernel_loss(output: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The same loss through the fused Triton kernel: the (b * s, vocab) logits never sit in memory whole."""
    from common.kernels.cross_entropy import linear_cross_entropy

    # (b, s, d) -> (b * s, d): one row per token, as the kernel takes them
    return linear_cross_entropy(hidden.flatten(0, 1), output.weight.to(hidden.dtype), targets.flatten())


class Llama(nn.Module):
    """Token embedding, n_layers blocks, a final RMSNorm and the output projection to the vocabulary."""

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.norm = (KernelRMSNorm if config.use_kernels else RMSNorm)(config.d_model, config.norm_eps)
        self.output = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one tensor, two uses
        self.head_loss = kernel_loss if config.use_kernels else eager_loss
        cos, sin = rope_tables(config.head_dim, config.max_seq_len, config.rope_theta)
        # Non-persistent: derived from the config, so not in the state dict; they move with .to(device).
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2's scaling: each block adds two outputs (wo, w2) to the residual stream, so their weights
        # are shrunk by 1/sqrt(2 n_layers) to keep the stream's variance from growing with depth.
        for name, param in self.named_parameters():
            if name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layers))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def hidden_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final normalised hidden states (b, s, d_model): everything but the output projection."""
        _, s = tokens.shape
        if s > self.config.max_seq_len:
            raise ValueError(
                f"sequence length {s} exceeds max_seq_len={self.config.max_seq_len}; "
                f"raise max_seq_len in the config (it sizes the rotary tables)"
            )
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]  # (s, head_dim // 2)
        x = self.tok_embeddings(tokens)  # (b, s, d_model)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.hidden_states(tokens))  # (b, s, vocab)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the next-token predictions; tokens and targets (b, s) long."""
        return self.head_loss(self.output, self.hidden_states(tokens), targets)


def random_batch(
    config: LlamaConfig, batch: int, seq_len: int, *, seed: int = 0, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens for timing and memory measurements: inputs and targets (the inputs shifted by one),
    each (batch, seq_len) long on `device`, the same for the same seed on every device."""
    tokens = torch.randint(
        0, config.vocab_size, (batch, seq_len + 1), generator=torch.Generator().manual_seed(seed)
    )
    return tokens[:, :-1].to(device), tokens[:, 1:].to(device)
