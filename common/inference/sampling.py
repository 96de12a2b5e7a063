"""From logits to the next token: greedy, temperature, top-k and top-p (nucleus) sampling.

    sampling = Sampling(temperature=0.8, top_k=50, top_p=0.95)
    probs = sampling.probs(logits)              # logits (..., vocab) -> probabilities (..., vocab), fp32
    token = sample(probs, generator)            # (...,) long: one draw from each row

Every rule is written as a *distribution* first and a draw second. Speculative sampling needs the
distributions themselves (it compares the draft's and the target's probability of a token), and a test can
check a distribution against an exact enumeration instead of against samples.

The order of the filters is the usual one (Hugging Face, gpt-fast): temperature, then top-k, then top-p on
what top-k left. `temperature=0` is greedy decoding: a one-hot distribution on the argmax (the first index
among equal maxima, as torch.argmax picks), so greedy is the special case of sampling that every caller
gets for free. `Sampling.next_token` draws a token; for greedy it takes the argmax directly, the token the
one-hot distribution would give, without building it (a few kernel launches fewer per token).

Shapes never depend on the values: top-k keeps the tokens at or above the k-th largest logit, top-p masks
a sorted copy and scatters the mask back, and `sample` draws with the exponential-race trick rather than
torch.multinomial. So a decode step that ends in these functions can be captured by CUDA graphs and
compiled by torch.compile without graph breaks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen from the logits; the default is plain sampling from the softmax."""

    temperature: float = 1.0  # 0: greedy; < 1 sharpens the distribution, > 1 flattens it
    top_k: int | None = None  # keep the k most likely tokens (ties with the k-th are kept too)
    top_p: float | None = None  # keep the fewest most likely tokens whose probability sums to >= top_p

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # also refuses NaN
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and (isinstance(self.top_k, bool) or not isinstance(self.top_k, int)):
            raise ValueError(f"top_k must be an int or None, got {self.top_k!r}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 (or None to keep every token), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (or None to keep every token), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def next_token(self, logits: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One token per row of logits (..., vocab) -> (...,) long: `sample(self.probs(logits))`, or for greedy
        its result, the argmax, directly."""
        if self.greedy:
            self._check_vocabulary(logits.shape[-1])
            return logits.argmax(-1)
        return sample(self.probs(logits), generator)

    def _check_vocabulary(self, vocab: int) -> None:
        if self.top_k is not None and self.top_k > vocab:
            raise ValueError(f"top_k={self.top_k} is larger than the vocabulary ({vocab} tokens)")

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution this rule draws from: logits (..., vocab) -> probabilities (..., vocab), fp32."""
        logits = logits.float()
        vocab = logits.shape[-1]
        self._check_vocabulary(vocab)
        if self.greedy:
            return torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
        logits = logits / self.temperature
        if self.top_k is not None:
            logits = keep_top_k(logits, self.top_k)
        probs = logits.softmax(-1)
        if self.top_p is not None:
            probs = keep_top_p(probs, self.top_p)
        return probs


GREEDY = Sampling(temperature=0)
PLAIN = Sampling()  # the model's softmax as it is


def keep_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Logits with every token below the k-th largest of its row set to -inf (ties with it are kept)."""
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def keep_top_p(probs: torch.Tensor, p: float) -> torch.Tensor:
    """The nucleus: the fewest most likely tokens whose probabilities sum to >= p, renormalised.

    A token is dropped when the tokens strictly more likely than it (in sorted order) already hold >= p,
    so the most likely token is always kept and the kept set is the smallest one that reaches p.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs  # (..., vocab): mass of the tokens ahead of each
    drop_sorted = mass_before >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    kept = probs.masked_fill(drop, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token from each row of probs (..., vocab) -> (...,) long; a generator must be on probs' device.

    The exponential race: with E_i independent Exp(1), argmax_i p_i / E_i is token i with probability p_i
    (E_i / p_i is Exp(p_i), and the smallest of independent exponentials is i with probability p_i / sum p).
    Unlike torch.multinomial it is elementwise work and an argmax, with no host sync, so it can sit inside
    a CUDA graph. A token of probability 0 never wins (0 / E = 0 < p_j / E_j for a kept token j).
    """
    race = torch.empty_like(probs).exponential_(1.0, generator=generator)
    # A draw of exactly 0 would make 0 / 0 = NaN for a dropped token, and argmax picks NaN: keep E > 0.
    race.clamp_min_(torch.finfo(race.dtype).tiny)
    return (probs / race).argmax(-1)
