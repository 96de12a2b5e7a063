"""Speculative decoding: a small draft model proposes tokens, the target checks them all in one forward.

    tokens, stats = speculative_generate(target, draft, prompt, max_new_tokens=64, draft_len=4)  # greedy
    tokens, stats = speculative_generate(target, draft, prompt, 64, draft_len=4,
                                         sampling=Sampling(temperature=0.8), generator=generator)
    stats.acceptance_rate, stats.tokens_per_round        # how much of the draft the target kept

Why it is faster: decoding a small batch is memory-bound, so the target's forward over draft_len + 1 tokens
costs about what one token costs. Each round the draft proposes draft_len tokens one by one (cheap), the
target scores them all at once, and the round emits the accepted ones plus one token of the target's own:
between 1 and draft_len + 1 tokens per target forward, never fewer than plain decoding.

What it returns is exactly what the target alone would produce (Leviathan et al. 2023, Chen et al. 2023):
token for token under greedy decoding, and in distribution under sampling, whatever the draft. See
`verify` for the rule and its proof. Greedy is the same rule: with temperature 0 every distribution is
one-hot, so it accepts a draft token exactly when it is the target's argmax, and otherwise emits the target's
argmax. `greedy_verify` writes that case out on the logits, without building one-hot distributions.

How many tokens a round gives: if the target keeps each draft token with probability
alpha = sum_x min(p(x), q(x)) = 1 - TV(p, q), independently, a round emits
(1 - alpha^(draft_len + 1)) / (1 - alpha) tokens on average (`expected_tokens_per_round`).

The caches make rejection cheap: a rejected token's keys and values stay in the static cache, and
`CachedDecoder.rollback` only moves the length back, so the next round overwrites them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.inference.generate import check_prompt, decoder_for
from common.inference.kv_cache import CachedDecoder
from common.inference.sampling import GREEDY, Sampling, sample
from common.models.llama import Llama


@dataclass
class SpeculativeStats:
    """Counts of one speculative generation; a round is one forward of the target."""

    rounds: int = 0
    drafted: int = 0  # draft tokens proposed: rounds * draft_len
    accepted: int = 0  # of those, kept by the target

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_round(self) -> float:
        """Tokens emitted per target forward (the accepted ones plus one per round), before truncation."""
        return (self.accepted + self.rounds) / self.rounds if self.rounds else 0.0


def expected_tokens_per_round(alpha: float, draft_len: int) -> float:
    """Mean tokens a round emits when each draft token is kept with probability alpha, independently:
    sum_{i=0}^{draft_len} alpha^i (the i-th token is emitted when the i before it were all accepted)."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha is a probability, got {alpha}")
    return float(draft_len + 1) if alpha == 1 else (1 - alpha ** (draft_len + 1)) / (1 - alpha)


def accepts(u: torch.Tensor, p_of_draft: torch.Tensor, q_of_draft: torch.Tensor) -> torch.Tensor:
    """Whether each draft token is kept: u < p(x) / q(x) for u ~ U[0, 1), i.e. with probability
    min(1, p(x) / q(x)); written as u q < p to avoid a division (q(x) > 0, since x was drawn from q)."""
    return u * q_of_draft < p_of_draft


def residual_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """max(p - q, 0), normalised over the last dim: where the target has more mass than the draft gave.

    Where p <= q everywhere (p == q) the residual is all zeros; such a row is never used (every draft token
    is then accepted), and p stands in for it so that no NaN appears.
    """
    residual = (target_probs - draft_probs).clamp_min(0.0)
    total = residual.sum(-1, keepdim=True)
    return torch.where(total > 0, residual / total.clamp_min(torch.finfo(total.dtype).tiny), target_probs)


def verify(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Speculative sampling's rule for each row of a batch: how many draft tokens to keep, and the next token.

    draft_tokens (b, k), drawn one by one from draft_probs (b, k, vocab), the draft's distributions q_i;
    target_probs (b, k + 1, vocab), the target's distributions p_i at the same positions and one beyond.
    Returns n_accepted (b,), the number of leading draft tokens kept, and next_token (b,): drawn from the
    residual max(p_i - q_i, 0) at the first rejected position i, or from p_k when all k were kept.

    Why the emitted token has the target's distribution (one position; the later ones are the same argument
    for the conditionals, given the accepted prefix): x ~ q is kept with probability min(1, p(x) / q(x)), so
    P(emit y, by acceptance) = q(y) min(1, p(y) / q(y)) = min(p(y), q(y)). A rejection happens with
    probability 1 - sum_x min(p(x), q(x)) = sum_x max(p(x) - q(x), 0), which is exactly the normalising
    constant of the residual, so P(emit y, by rejection) = max(p(y) - q(y), 0). The sum is
    min(p, q) + max(p - q, 0) = p(y). Resampling from p instead of the residual would count the mass
    min(p, q) twice; keeping every draft token would emit q.
    """
    b, k = draft_tokens.shape
    p_of_draft = target_probs[:, :k].gather(-1, draft_tokens[..., None]).squeeze(-1)  # (b, k): p_i(x_i)
    q_of_draft = draft_probs.gather(-1, draft_tokens[..., None]).squeeze(-1)  # (b, k): q_i(x_i)
    u = torch.rand((b, k), generator=generator, device=draft_tokens.device)
    kept = accepts(u, p_of_draft, q_of_draft)  # (b, k)
    n_accepted = kept.long().cumprod(-1).sum(-1)  # (b,): length of the leading run of kept tokens
    # The next token's distribution for each possible n_accepted: residuals at 0 ... k-1, then p_k.
    candidates = torch.cat([residual_distribution(target_probs[:, :k], draft_probs), target_probs[:, k:]], 1)
    next_probs = candidates[torch.arange(b, device=candidates.device), n_accepted]  # (b, vocab)
    return n_accepted, sample(next_probs, generator)


def greedy_verify(
    draft_tokens: torch.Tensor, target_logits: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`verify` at temperature 0, from the target's logits (b, k + 1, vocab): (n_accepted, next_token).

    With one-hot distributions p_i and q_i, verify keeps draft token x_i exactly when p_i(x_i) = 1 (when
    x_i is the target's argmax), and the residual at the first rejection, like p_k after k acceptances, is
    the one-hot of the target's argmax there. So: keep the leading draft tokens that equal the target's
    argmax, then emit the target's argmax at the next position. The same tokens as verify on one-hot
    probabilities (the tests check it), in a handful of kernels instead of a few dozen: with a host sync
    every round, the host's time per round shows in tokens/s.
    """
    choices = target_logits.argmax(-1)  # (b, k + 1): the target's greedy token at each position
    k = draft_tokens.shape[1]
    n_accepted = (draft_tokens == choices[:, :k]).long().cumprod(-1).sum(-1)  # (b,)
    return n_accepted, choices.gather(1, n_accepted[:, None])[:, 0]


@torch.no_grad()
def speculate(
    target: CachedDecoder,
    draft: CachedDecoder,
    sequence: torch.Tensor,
    draft_len: int,
    sampling: Sampling = GREEDY,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round on sequence (b, n): draft_tokens (b, draft_len), n_accepted (b,) and next_token (b,).

    Each decoder is fed the tokens of `sequence` it has not cached yet (the prompt in the first round, then
    one or two), so both caches must hold a prefix of `sequence` of the same length in every row. The
    caller appends the kept tokens and rolls the caches back (see `speculative_generate`). A batch of
    identical rows runs independent rounds: that is how the tests measure the emitted token's distribution.
    """
    new_tokens = sequence[:, draft.length :]
    drafted, draft_probs = [], []
    for _ in range(draft_len):
        logits = draft.feed(new_tokens)[:, -1]  # (b, vocab)
        if sampling.greedy:  # the token a one-hot q would give, without building q (see greedy_verify)
            new_tokens = sampling.next_token(logits)[:, None]  # (b, 1)
        else:
            q = sampling.probs(logits)  # (b, vocab)
            new_tokens = sample(q, generator)[:, None]  # (b, 1)
            draft_probs.append(q)
        drafted.append(new_tokens)
    draft_tokens = torch.cat(drafted, dim=1)  # (b, draft_len)
    # The target scores the unseen tail of the sequence and every draft token in one forward.
    target_logits = target.feed(torch.cat([sequence[:, target.length :], draft_tokens], dim=1))
    target_logits = target_logits[:, -(draft_len + 1) :]  # (b, draft_len + 1, vocab)
    if sampling.greedy:
        n_accepted, next_token = greedy_verify(draft_tokens, target_logits)
    else:
        target_probs = sampling.probs(target_logits)
        n_accepted, next_token = verify(draft_tokens, torch.stack(draft_probs, 1), target_probs, generator)
    return draft_tokens, n_accepted, next_token


@torch.no_grad()
def speculative_generate(
    target: Llama,
    draft: Llama,
    prompt: torch.Tensor,
    max_new_tokens: int,
    draft_len: int,
    sampling: Sampling = GREEDY,
    *,
    generator: torch.Generator | None = None,
    target_decoder: CachedDecoder | None = None,
    draft_decoder: CachedDecoder | None = None,
) -> tuple[torch.Tensor, SpeculativeStats]:
    """The prompt (1, s) and max_new_tokens tokens with the target's distribution, and the round counts.

    One sequence at a time: rows of a batch would accept different numbers of tokens and fall out of step.
    The last round may emit more tokens than asked for; the extra ones are cut off. Decoders passed in
    (e.g. compiled ones, batch 1, max_len >= s + max_new_tokens + draft_len - 1) are reset and reused; the
    shapes they see are few: the target s + draft_len then 1 + draft_len, the draft s, then 1 or 2.
    """
    check_prompt(target, prompt)
    if prompt.shape[0] != 1:
        raise ValueError(
            f"speculative decoding here runs one sequence at a time; the prompt has {prompt.shape[0]}"
        )
    if draft.config.vocab_size != target.config.vocab_size:
        raise ValueError(
            f"the draft's vocabulary ({draft.config.vocab_size} tokens) is not the target's "
            f"({target.config.vocab_size}): the draft must propose tokens of the target's vocabulary"
        )
    if draft_len < 1 or max_new_tokens < 1:
        raise ValueError(f"draft_len={draft_len} and max_new_tokens={max_new_tokens} must both be >= 1")
    s = prompt.shape[1]
    # The last round starts with at most s + max_new_tokens - 1 tokens and feeds draft_len more.
    max_len = s + max_new_tokens - 1 + draft_len
    for name, model in (("target", target), ("draft", draft)):
        if max_len > model.config.max_seq_len:
            raise ValueError(
                f"a prompt of {s} tokens, {max_new_tokens} new ones and draft_len={draft_len} need {max_len} "
                f"positions, more than the {name}'s max_seq_len={model.config.max_seq_len}"
            )
    target_decoder = decoder_for(target, 1, max_len, target_decoder)
    draft_decoder = decoder_for(draft, 1, max_len, draft_decoder)
    sequence, stats = prompt, SpeculativeStats()
    while sequence.shape[1] < s + max_new_tokens:
        n = sequence.shape[1]
        draft_tokens, n_accepted, next_token = speculate(
            target_decoder, draft_decoder, sequence, draft_len, sampling, generator
        )
        kept = int(n_accepted.item())  # note: a host sync per round, to know how far to roll back
        sequence = torch.cat([sequence, draft_tokens[:, :kept], next_token[:, None]], dim=1)
        # Valid cache entries: the first n + kept tokens (the new last token has not been fed anywhere).
        target_decoder.rollback(n + kept)
        draft_decoder.rollback(min(draft_decoder.length, n + kept))
        stats.rounds += 1
        stats.drafted += draft_len
        stats.accepted += kept
    return sequence[:, : s + max_new_tokens], stats


def acceptance_probability(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """alpha = sum_x min(p(x), q(x)) over the last dim: the chance that a draft token x ~ q is kept."""
    return torch.minimum(target_probs, draft_probs).sum(-1)
