"""A generated language with learnable structure: each token depends on the two before it (a trigram chain).

    language = TrigramLanguage(vocab_size=32, branching=4, seed=0)
    tokens = language.sample(64, 32, generator)        # (64, 32) long: training data, made on the fly
    probs = language.next_token_probs(tokens)          # (64, 31, 32): the exact distribution of tokens[:, 1:]

After each pair (a, b) only `branching` tokens can follow, with random weights: a model has a real
distribution to learn (not a lookup, not noise), the best possible loss can be computed on any sample (`loss`),
and a small draft learns it less well than a larger target, which is what speculative decoding needs to be
worth measuring. No download, no tokenizer: the same seed gives the same language on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class TrigramLanguage:
    """Token t+1 drawn from table[t-1, t]; the first two tokens of a sequence are uniform."""

    vocab_size: int = 32
    branching: int = 4  # how many tokens may follow a pair
    seed: int = 0

    def __post_init__(self) -> None:
        if not 2 <= self.vocab_size:
            raise ValueError(f"vocab_size must be >= 2, got {self.vocab_size}")
        if not 1 <= self.branching <= self.vocab_size:
            raise ValueError(f"branching must be in [1, vocab_size={self.vocab_size}], got {self.branching}")

    @cached_property
    def table(self) -> torch.Tensor:
        """(vocab, vocab, vocab) fp32: table[a, b] is the distribution of the token after the pair (a, b)."""
        v, generator = self.vocab_size, torch.Generator().manual_seed(self.seed)
        followers = torch.rand(v, v, v, generator=generator).argsort(-1)[
            ..., : self.branching
        ]  # (v, v, branching)
        weights = torch.rand(v, v, self.branching, generator=generator) + 0.1  # no follower is negligible
        table = torch.zeros(v, v, v).scatter_(-1, followers, weights)
        return table / table.sum(-1, keepdim=True)

    def next_token_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """The exact distribution of tokens[:, 2:] given what precedes: tokens (b, s) -> (b, s - 2, vocab)."""
        return self.table[tokens[:, :-2], tokens[:, 1:-1]]

    def loss(self, tokens: torch.Tensor) -> float:
        """Mean -log P(token) over tokens[:, 2:] under the true chain: the floor a model's loss approaches."""
        probs = self.next_token_probs(tokens).gather(-1, tokens[:, 2:, None])
        return -probs.double().log().mean().item()

    def sample(self, n: int, length: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n sequences of `length` tokens (n, length) long."""
        if length < 2:
            raise ValueError(f"length must be >= 2 (a pair starts every sequence), got {length}")
        tokens = torch.empty(n, length, dtype=torch.long)
        tokens[:, :2] = torch.randint(self.vocab_size, (n, 2), generator=generator)
        for t in range(2, length):
            tokens[:, t] = torch.multinomial(
                self.table[tokens[:, t - 2], tokens[:, t - 1]], 1, generator=generator
            )[:, 0]
        return tokens
