"""A model beside its KV cache, one sequence at a time: what `fastinfer.speculative` drives. Given, not submitted.

    decoder = Decoder(model, max_len=64)
    logits = decoder.extend(prompt)         # prompt (s,) long -> logits (s, vocab); len(decoder) == s
    logits = decoder.extend(token[None])    # one more position -> (1, vocab): row i predicts position len + i + 1
    decoder.truncate(s)                     # forget every position from s on; the next extend writes there

A thin face on `common.inference.kv_cache.CachedDecoder` (read it: a static cache, `rollback` only moves the
length back). It keeps a log of every `extend`, the position it started at and the tokens it ran, which the
tests read to count the model's forwards and to check what the cache held at each of them.
"""

from __future__ import annotations

import torch

from common.inference.kv_cache import CachedDecoder
from common.models.llama import Llama


class Decoder:
    """`model` with a KV cache of up to `max_len` positions for one sequence; `len(decoder)` positions held."""

    def __init__(self, model: Llama, max_len: int) -> None:
        self._cache = CachedDecoder(model, batch_size=1, max_len=max_len)
        self.max_len = max_len
        self.vocab_size = model.config.vocab_size
        # Per extend: (first position, a copy of the tokens run).
        self.log: list[tuple[int, torch.Tensor]] = []

    def __len__(self) -> int:
        return self._cache.length

    @torch.no_grad()
    def extend(self, tokens: torch.Tensor) -> torch.Tensor:
        """Run tokens (s,) long at positions len(self) ... len(self) + s - 1, caching their keys and values;
        their logits (s, vocab): row i is the model's prediction for the token after tokens[i]."""
        if tokens.dim() != 1 or tokens.dtype != torch.long:
            raise ValueError(
                f"tokens must be a 1-D long tensor (one sequence), got shape {tuple(tokens.shape)} and dtype "
                f"{tokens.dtype}"
            )
        self.log.append((len(self), tokens.clone()))  # on the tokens' device: logging needs no host sync
        return self._cache.feed(tokens[None])[0]

    def truncate(self, length: int) -> None:
        """Keep only the first `length` positions (0 <= length <= len(self))."""
        self._cache.rollback(length)
