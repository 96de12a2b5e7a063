"""Greedy speculative decoding over KV caches: a draft proposes, the target checks all proposals in one forward.

    target, draft = Decoder(big_model, max_len), Decoder(small_model, max_len)   # both empty
    tokens = speculative_greedy(target, draft, prompt, max_new_tokens=64, draft_len=4)

What you will learn: why decoding a few tokens costs about what decoding one costs (a decode step is
memory-bound: it reads every weight for one token), so the target can *verify* draft_len proposals in the
time it would take to produce one; why the result is exactly the target's own greedy output, whatever the
draft; and how a static KV cache makes a rejected guess free to forget (truncate: move the length back).

One round, with sequence = the tokens so far (prompt, then every token emitted):

1. the draft proposes draft_len tokens greedily, one `extend` each (it first catches up on the tokens of the
   sequence it has not cached);
2. the target runs, in ONE `extend`, the tokens of the sequence it has not cached followed by the draft_len
   proposals. Its logits give its own greedy choice after each prefix: after the sequence, after the first
   proposal, ..., after all draft_len of them (draft_len + 1 choices);
3. keep the longest run of leading proposals that equal the target's choices (n of them), then append the
   target's choice after those n: at a mismatch it corrects the draft, and if all draft_len were kept it is
   a bonus token. So each round emits between 1 and draft_len + 1 tokens, each the target's greedy choice;
4. truncate both caches so they hold only positions of the sequence as it is now: the target's keys and
   values of rejected proposals must not survive into the next round (the next extend writes after them).

Not allowed here: `common.inference.speculative`, the course's own implementation (the grader refuses to
import it). The rest of `common.inference` and of the course library is yours to use.
"""

from __future__ import annotations

import torch

from fastinfer.decoder import Decoder


def speculative_greedy(target: Decoder, draft: Decoder, prompt: torch.Tensor, max_new_tokens: int,
                       draft_len: int) -> torch.Tensor:  # fmt: skip
    """The prompt (s,) long followed by the target's greedy continuation of max_new_tokens tokens,
    (s + max_new_tokens,) long: token for token what decoding the target alone, one argmax at a time, gives.

    `target` and `draft` start empty and have caches of at least s + max_new_tokens + draft_len - 1
    positions. Each round runs the target exactly once (steps 1-4 of the module docstring: the target's
    first extend takes the prompt and the first proposals together). At every target extend, the target's
    cache holds a prefix of the returned sequence: rejected proposals are truncated away after each round.
    A last round that emits more tokens than asked for is cut off. A prompt that is not a
    non-empty 1-D long tensor, draft_len < 1, max_new_tokens < 1 or decoders that are not empty are a
    ValueError that names the problem.
    """
    # BEGIN SOLUTION: speculative_greedy: check the arguments; then rounds of draft_len greedy proposals, one target extend, keep the agreeing run plus the target's next token, truncate both caches
    if prompt.dim() != 1 or prompt.numel() == 0 or prompt.dtype != torch.long:
        raise ValueError(
            f"prompt must be a non-empty 1-D long tensor, got shape {tuple(prompt.shape)}, dtype {prompt.dtype}"
        )
    if draft_len < 1:
        raise ValueError(f"draft_len (tokens the draft proposes per round) must be >= 1, got {draft_len}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if len(target) or len(draft):
        raise ValueError(
            f"the decoders must start empty; they hold {len(target)} (target) and {len(draft)} (draft) positions"
        )
    goal = prompt.numel() + max_new_tokens
    sequence = prompt
    while sequence.numel() < goal:
        n = sequence.numel()
        new, proposals = sequence[len(draft) :], []
        for _ in range(draft_len):
            new = draft.extend(new)[-1].argmax()[None]  # (1,)
            proposals.append(new)
        proposed = torch.cat(proposals)  # (draft_len,)
        logits = target.extend(torch.cat([sequence[len(target) :], proposed]))
        # (draft_len + 1,): the target's choice after each prefix
        choices = logits[-(draft_len + 1) :].argmax(-1)
        kept = int((choices[:-1] == proposed).long().cumprod(0).sum())  # note: a host sync per round
        sequence = torch.cat([sequence, proposed[:kept], choices[kept : kept + 1]])
        # Valid now: the first n + kept positions (the last token emitted has been run by neither model).
        target.truncate(n + kept)
        draft.truncate(min(len(draft), n + kept))
    return sequence[:goal]
    # END SOLUTION
