"""Autoregressive generation with a static KV cache: prefill the prompt once, then one token per step.

    tokens = generate(model, prompt, max_new_tokens=32)      # greedy: prompt (b, s) -> (b, s + 32)
    tokens = generate(model, prompt, 32, Sampling(temperature=0.8, top_p=0.95),
                      generator=torch.Generator().manual_seed(0))

For speed on a GPU, build the decoder once and pass it in (it is reset, not reallocated):

    decoder = GraphedDecoder(model, batch_size=1, max_len=512)   # compiled; one CUDA graph per input length
    tokens = generate(model, prompt, 256, decoder=decoder)

(`CachedDecoder` compiled with `mode="reduce-overhead"` also replays CUDA graphs, at a higher host cost per
step: graphed_decoder.py says why.)
"""

from __future__ import annotations

import torch

from common.inference.kv_cache import CachedDecoder
from common.inference.sampling import GREEDY, Sampling
from common.models.llama import Llama


def check_prompt(model: Llama, prompt: torch.Tensor) -> None:
    """Refuse a prompt that is not (batch, s >= 1) of token ids inside the model's vocabulary."""
    if prompt.dim() != 2 or prompt.shape[1] == 0 or prompt.dtype != torch.long:
        raise ValueError(
            f"prompt must be a (batch, s) long tensor with s >= 1 (one row per sequence, equal lengths), "
            f"got shape {tuple(prompt.shape)} and dtype {prompt.dtype}"
        )
    vocab = model.config.vocab_size
    low, high = prompt.min().item(), prompt.max().item()  # note: a host sync, once per prompt
    if low < 0 or high >= vocab:
        raise ValueError(f"prompt holds token ids in [{low}, {high}], outside the vocabulary [0, {vocab})")


def decoder_for(
    model: Llama, batch_size: int, positions_needed: int, decoder: CachedDecoder | None
) -> CachedDecoder:
    """`decoder`, reset, when it is this model's and has room; a new one of the exact size when None."""
    if decoder is None:
        return CachedDecoder(model, batch_size, positions_needed)
    if decoder.model is not model:
        raise ValueError("the decoder passed in wraps another model")
    if decoder.batch_size != batch_size or decoder.max_len < positions_needed:
        raise ValueError(
            f"this generation needs a cache of batch {batch_size} and max_len >= {positions_needed}, "
            f"the decoder passed in has batch {decoder.batch_size} and max_len {decoder.max_len}"
        )
    decoder.rollback(0)
    return decoder


@torch.no_grad()
def generate(
    model: Llama,
    prompt: torch.Tensor,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    *,
    generator: torch.Generator | None = None,
    decoder: CachedDecoder | None = None,
) -> torch.Tensor:
    """The prompt (batch, s) followed by max_new_tokens tokens drawn by `sampling`: (batch, s + max_new_tokens).

    The cache needs s + max_new_tokens - 1 positions: the last token is sampled, never fed.
    """
    check_prompt(model, prompt)
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, s = prompt.shape
    needed = s + max_new_tokens - 1
    if needed > model.config.max_seq_len:
        raise ValueError(
            f"a prompt of {s} tokens and {max_new_tokens} new ones need {needed} positions, more than the "
            f"model's max_seq_len={model.config.max_seq_len}: shorten the prompt or ask for fewer tokens"
        )
    decoder = decoder_for(model, batch, needed, decoder)
    tokens = [prompt]
    logits = decoder.feed(prompt)[:, -1]  # prefill: the whole prompt in one forward
    for step in range(max_new_tokens):
        next_token = sampling.next_token(logits, generator)[:, None]  # (batch, 1)
        tokens.append(next_token)
        if step + 1 < max_new_tokens:
            logits = decoder.feed(next_token)[:, -1]
    return torch.cat(tokens, dim=1)
