"""Tiny random Llamas and no-cache references shared by the tests of common.inference."""

from __future__ import annotations

import copy

import torch

from common.models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=48)


def random_llama(seed: int, config: LlamaConfig = CONFIG, logit_scale: float = 10.0) -> Llama:
    """A random Llama whose next-token distributions are far from uniform.

    At the default init (std 0.02) the logits have a std of about 0.1, so every distribution is nearly
    uniform and greedy choices hang on gaps of 1e-3; the output projection scaled by `logit_scale` gives
    logits of std about 1: distinct distributions, and argmax gaps well above fp32 rounding.
    """
    torch.manual_seed(seed)
    model = Llama(config).eval()
    with torch.no_grad():
        model.output.weight.mul_(logit_scale)
    return model


def perturbed_copy(model: Llama, noise: float, seed: int) -> Llama:
    """A draft close to `model`: every weight plus Gaussian noise of `noise` times that tensor's std.
    At noise 0.2 a greedy draft of the toy config is kept about half the time: partial acceptance."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * param.std() * noise)
    return draft


@torch.no_grad()
def greedy_without_cache(model: Llama, prompt: torch.Tensor, n_new: int) -> tuple[torch.Tensor, float]:
    """Greedy decoding by recomputing the whole sequence for every token; also the smallest gap between the
    best and second-best logit met on the way (a comparison of token ids is meaningful only if it is far
    above the rounding differences between two ways of computing the logits, ~1e-6 here)."""
    tokens, smallest_gap = prompt, float("inf")
    for _ in range(n_new):
        logits = model(tokens)[:, -1]
        top2 = logits.topk(2, dim=-1).values
        smallest_gap = min(smallest_gap, (top2[:, 0] - top2[:, 1]).min().item())
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens, smallest_gap


def random_prompt(config: LlamaConfig, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))
