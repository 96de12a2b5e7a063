"""Decoding the week-5 Llama with a static KV cache: each token's keys and values computed once.

    decoder = CachedDecoder(model, batch_size=2, max_len=64)   # the cache is allocated here, once
    logits = decoder.feed(prompt)           # prompt (2, s): prefill, logits (2, s, vocab)
    logits = decoder.feed(next_tokens)      # (2, 1): one decode step attends to all s + 1 positions
    decoder.rollback(s)                     # forget everything after position s (speculative decoding)

Without a cache, producing token t recomputes the keys and values of all t earlier tokens: O(t^2) work per
sequence of t. With one, a decode step projects only the new token and attends to the stored keys/values.

Why static: the cache holds max_len positions from the start, and a step reads all of them under a mask
"key position <= query position" rather than slicing the filled part. Every tensor of a step then has the
same shape at every position, the positions enter as a tensor (not a Python int baked into the code), and
the cache is written in place at those positions. So `decoder.compile(mode="reduce-overhead")` records one
CUDA graph per input shape and replays it for every step (the pattern of gpt-fast's generate.py), and
`GraphedDecoder` (graphed_decoder.py) captures them by hand, for less host time per step.
The price: each step reads max_len keys, filled or not, so max_len should fit the need.

Rolling back is free: positions past the kept length hold stale keys, but a query never sees a key past its
own position, and the next feed writes its positions before attending.

The model is used as it is: `forward` calls its embedding, norms, projections, rotary tables and
feed-forward (common.models.llama), and replaces only the attention, which must read the cache.
Lengths are checked on the host, in `feed`, as Python ints: checking the positions tensor inside
`forward` would be a host-device sync in every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from common.inference.fused_projections import is_fused
from common.models.llama import Attention, Llama, apply_rotary

# How cached_attention computes it: "sdpa" repeats the cache's keys and values for each query group and calls
# F.scaled_dot_product_attention; "reductions" writes it as products and sums (for compiled decoding).
ATTENTION_FORMS = ("sdpa", "reductions")


class KVCache(nn.Module):
    """Keys and values of every layer, (n_layers, batch, n_kv_heads, max_len, head_dim) each, zeros at first."""

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.register_buffer("keys", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("values", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(
        self, layer: int, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store keys/values (batch, n_kv_heads, s, head_dim) at positions (s,); return the layer's whole
        cache (batch, n_kv_heads, max_len, head_dim) for keys and for values."""
        self.keys[layer].index_copy_(2, positions, keys)  # in place: the buffer's address never changes
        self.values[layer].index_copy_(2, positions, values)
        return self.keys[layer], self.values[layer]


def cached_attention(
    attention: Attention,
    cache: KVCache,
    layer: int,
    x: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    form: str = "sdpa",
) -> torch.Tensor:
    """`attention`'s forward for new tokens x (b, s, d_model) at positions (s,), reading and writing the cache.

    The same projections and rotary embedding as Attention.forward; the difference is where keys and values
    come from: the cache, which now holds these tokens' too, all max_len positions of it, masked so that a
    query at position p sees the keys at positions <= p. form: how the scores are computed (ATTENTION_FORMS).
    """
    b, s, _ = x.shape
    hd = attention.head_dim
    # One matmul if fuse_projections merged them (fused_projections.py), three otherwise
    q, k, v = (
        attention.wqkv(x) if is_fused(attention) else (attention.wq(x), attention.wk(x), attention.wv(x))
    )
    q = apply_rotary(q.view(b, s, -1, hd), cos, sin)  # (b, s, n_q_heads, hd)
    k = apply_rotary(k.view(b, s, -1, hd), cos, sin)  # (b, s, n_kv_heads, hd)
    v = v.view(b, s, -1, hd)
    keys, values = cache.write(layer, positions, k.transpose(1, 2), v.transpose(1, 2))  # (b, kv, max_len, hd)
    visible = torch.arange(keys.shape[2], device=x.device) <= positions[:, None]  # (s, max_len)
    y = _attention_of_form(form)(q, keys, values, visible)
    return attention.wo(y.reshape(b, s, -1))  # (b, s, n_q_heads * hd) -> (b, s, d_model)


def _sdpa_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """Queries (b, s, n_q, hd) against the cache (b, kv, L, hd), repeated for the query groups: (b, s, n_q, hd)."""
    group = q.shape[2] // keys.shape[1]  # grouped-query: kv head j serves query heads j*g ... j*g + g - 1
    keys = keys.repeat_interleave(group, dim=1)  # (b, n_q_heads, max_len, hd)
    values = values.repeat_interleave(group, dim=1)
    y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=visible)  # (b, n_q, s, hd)
    return y.transpose(1, 2)


def _reduction_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, visible: torch.Tensor
) -> torch.Tensor:
    """The same attention as products and sums, each query group beside its kv head: (b, s, n_q, hd).

    Nothing is repeated and nothing calls a matmul library, so torch.compile can fuse the scores, the
    softmax and the weighted sum into a few reduction kernels over the cache. Sums run in fp32 at least
    (float64 stays float64). Eager, it materializes b * n_q * s * max_len * hd products: meant for compiled
    decode steps, where s is 1."""
    b, s, n_q, hd = q.shape
    kv = keys.shape[1]
    wide = torch.promote_types(q.dtype, torch.float32)
    grouped = q.view(b, s, kv, n_q // kv, hd).permute(0, 2, 3, 1, 4)  # (b, kv, g, s, hd)
    products = grouped[..., None, :].to(wide) * keys[:, :, None, None].to(wide)  # (b, kv, g, s, L, hd)
    scores = products.sum(-1) * hd**-0.5  # (b, kv, g, s, L)
    weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    y = (weights[..., None] * values[:, :, None, None].to(wide)).sum(-2)  # (b, kv, g, s, hd)
    return y.to(q.dtype).permute(0, 3, 1, 2, 4).reshape(b, s, n_q, hd)


def _attention_of_form(form: str) -> Callable[..., torch.Tensor]:
    """The function that computes attention in `form` (one of ATTENTION_FORMS)."""
    if form == "sdpa":
        return _sdpa_attention
    if form == "reductions":
        return _reduction_attention
    raise ValueError(f"unknown attention form {form!r}; choose one of {', '.join(ATTENTION_FORMS)}")


class CachedDecoder(nn.Module):
    """A Llama beside a static KV cache for `batch_size` sequences of up to `max_len` tokens; `attention`:
    the form cached_attention computes it in (ATTENTION_FORMS)."""

    def __init__(self, model: Llama, batch_size: int, max_len: int, attention: str = "sdpa") -> None:
        super().__init__()
        config = model.config
        if max_len < 1 or batch_size < 1:
            raise ValueError(f"max_len={max_len} and batch_size={batch_size} must both be positive")
        _attention_of_form(attention)  # an unknown form fails here, not at the first feed
        if max_len > config.max_seq_len:
            raise ValueError(
                f"a cache of max_len={max_len} positions is longer than the model's max_seq_len="
                f"{config.max_seq_len} (the length of its rotary tables): use max_len <= {config.max_seq_len}"
            )
        weight = model.tok_embeddings.weight
        self.model = model
        self.cache = KVCache(
            config.n_layers,
            batch_size,
            config.n_kv_heads,
            max_len,
            config.head_dim,
            dtype=weight.dtype,  # keys and values in the model's dtype, on its device
            device=weight.device,
        )
        self.batch_size, self.max_len, self.attention = batch_size, max_len, attention
        self.length = 0  # positions 0 ... length - 1 hold valid keys and values (host bookkeeping)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (b, s, vocab) of tokens (b, s) at positions (s,) long, the cache written at those positions.

        No checks and no host syncs here, so that this is what torch.compile and CUDA graphs capture;
        `feed` checks the lengths. Positions must be < max_len and follow the cached ones.
        """
        model = self.model
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (s, head_dim // 2)
        x = model.tok_embeddings(tokens)  # (b, s, d_model)
        for i, block in enumerate(model.layers):
            x = x + cached_attention(
                block.attention, self.cache, i, block.attention_norm(x), positions, cos, sin, self.attention
            )
            x = x + block.feed_forward(block.ffn_norm(x))
        return model.output(model.norm(x))

    def feed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run tokens (batch_size, s) at the next s positions; their logits (batch_size, s, vocab)."""
        if tokens.dim() != 2 or tokens.shape[0] != self.batch_size:
            raise ValueError(
                f"tokens must be (batch_size={self.batch_size}, s), got shape {tuple(tokens.shape)}; "
                "the cache was allocated for that batch size"
            )
        s = tokens.shape[1]
        if s == 0:
            raise ValueError("no tokens to feed: tokens has length 0")
        if self.length + s > self.max_len:
            raise ValueError(
                f"cannot feed {s} tokens after {self.length} cached ones: the cache holds max_len="
                f"{self.max_len} positions; allocate a CachedDecoder with max_len >= {self.length + s}"
            )
        logits = self._run(tokens)
        self.length += s
        return logits

    def _run(self, tokens: torch.Tensor) -> torch.Tensor:
        """forward at the next tokens.shape[1] positions (the lengths already checked); subclasses change how."""
        positions = torch.arange(self.length, self.length + tokens.shape[1], device=tokens.device)
        # A slice of a longer sequence has the longer one's strides, and a compiled forward guards on
        # strides: a fresh copy with standard strides keeps one graph per shape (a copy of a few ids).
        return self(tokens.clone(memory_format=torch.contiguous_format), positions)

    def rollback(self, length: int) -> None:
        """Keep only the first `length` positions; what follows is overwritten by the next feed."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot roll back to length {length}: the cache holds {self.length} positions")
        self.length = length
