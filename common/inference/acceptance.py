"""How often does a trained draft agree with a trained target? Measured, and predicted by the formula.

    python -m common.inference.acceptance                       # about a minute on a laptop CPU
    python -m common.inference.acceptance --draft-len 2 --temperature 0.7 --target-steps 600

Trains a tiny target and a tinier draft (common.models.llama) on the generated trigram language of
common.inference.toy_language, then runs speculative sampling from a few prompts and reports:

- each model's held-out loss next to the language's own (the floor): how well each learned;
- alpha: the mean over the generated positions of sum_x min(p(x), q(x)), the probability that the draft's
  token is kept, computed from both models' distributions without sampling anything;
- tokens per target forward: measured in the run, and predicted by (1 - alpha^(k+1)) / (1 - alpha) for
  draft length k. The prediction assumes every position has the same alpha, independently; positions
  differ, so the two agree roughly, not exactly.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import torch

from common.inference.sampling import Sampling
from common.inference.speculative import (
    SpeculativeStats,
    acceptance_probability,
    expected_tokens_per_round,
    speculative_generate,
)
from common.inference.toy_language import TrigramLanguage
from common.models.llama import Llama, LlamaConfig


@dataclass
class AcceptanceExperiment:
    """Sizes and budgets of the experiment; the defaults run in about a minute on a CPU."""

    language: TrigramLanguage = field(default_factory=lambda: TrigramLanguage(vocab_size=16, branching=3))
    target: LlamaConfig = field(
        default_factory=lambda: LlamaConfig(
            vocab_size=16, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64
        )
    )
    draft: LlamaConfig = field(
        default_factory=lambda: LlamaConfig(
            vocab_size=16, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32, max_seq_len=64
        )
    )
    target_steps: int = 300
    draft_steps: int = 100
    batch_size: int = 32
    seq_len: int = 32
    lr: float = 1e-2
    draft_len: int = 4
    n_prompts: int = 8
    new_tokens: int = 24
    temperature: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        for name, config in (("target", self.target), ("draft", self.draft)):
            if config.vocab_size != self.language.vocab_size:
                raise ValueError(
                    f"the {name}'s vocab_size={config.vocab_size} is not the language's {self.language.vocab_size}"
                )
        if self.seq_len + 1 > self.target.max_seq_len or self.seq_len + 1 > self.draft.max_seq_len:
            raise ValueError(f"seq_len={self.seq_len} + 1 tokens must fit both models' max_seq_len")


def train(model: Llama, language: TrigramLanguage, steps: int, experiment: AcceptanceExperiment) -> float:
    """`steps` of AdamW on freshly sampled sequences (drawn on the CPU, moved to the model's device); the last
    step's loss."""
    generator = torch.Generator().manual_seed(experiment.seed + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=experiment.lr, weight_decay=0.0)
    device = model.tok_embeddings.weight.device
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        tokens = language.sample(experiment.batch_size, experiment.seq_len + 1, generator).to(device)
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return loss.item()


@torch.no_grad()
def held_out_loss(model: Llama, tokens: torch.Tensor) -> float:
    """Mean cross-entropy of the predictions of tokens[:, 2:], the positions the language's floor covers."""
    logits = model(tokens[:, :-1])[:, 1:]  # predictions of tokens 2 ... s - 1
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 2:].flatten()).item()


@torch.no_grad()
def mean_alpha(target: Llama, draft: Llama, sequences: torch.Tensor, start: int, sampling: Sampling) -> float:
    """The mean of sum_x min(p(x), q(x)) over the positions start ... s - 1 of sequences (b, s)."""
    p = sampling.probs(target(sequences[:, :-1])[:, start - 1 :])  # distributions of tokens start ... s - 1
    q = sampling.probs(draft(sequences[:, :-1])[:, start - 1 :])
    return acceptance_probability(p, q).mean().item()


def run(experiment: AcceptanceExperiment) -> dict[str, float]:
    """Train both models, generate speculatively from n_prompts prompts, and return the measurements."""
    language = experiment.language
    torch.manual_seed(experiment.seed)
    target, draft = Llama(experiment.target), Llama(experiment.draft)
    train(target, language, experiment.target_steps, experiment)
    train(draft, language, experiment.draft_steps, experiment)
    held_out = language.sample(64, experiment.seq_len, torch.Generator().manual_seed(experiment.seed + 2))
    sampling = Sampling(temperature=experiment.temperature)
    generator = torch.Generator().manual_seed(experiment.seed + 3)
    prompts = language.sample(experiment.n_prompts, 4, generator)
    outputs, runs = [], []
    for prompt in prompts:
        tokens, stats = speculative_generate(
            target,
            draft,
            prompt[None],
            experiment.new_tokens,
            experiment.draft_len,
            sampling,
            generator=generator,
        )
        outputs.append(tokens)
        runs.append(stats)
    total = SpeculativeStats(
        rounds=sum(s.rounds for s in runs),
        drafted=sum(s.drafted for s in runs),
        accepted=sum(s.accepted for s in runs),
    )
    alpha = mean_alpha(target, draft, torch.cat(outputs), prompts.shape[1], sampling)
    return {
        "language_loss": language.loss(held_out),
        "target_loss": held_out_loss(target, held_out),
        "draft_loss": held_out_loss(draft, held_out),
        "alpha": alpha,
        "acceptance_rate": total.acceptance_rate,
        "tokens_per_round": total.tokens_per_round,
        "predicted_tokens_per_round": expected_tokens_per_round(alpha, experiment.draft_len),
    }


def report(results: dict[str, float], experiment: AcceptanceExperiment) -> str:
    k = experiment.draft_len
    return "\n".join(
        [
            f"held-out loss (nats/token): language {results['language_loss']:.3f} (the floor), "
            f"target {results['target_loss']:.3f}, draft {results['draft_loss']:.3f}",
            f"alpha = mean sum_x min(p, q) over the generated positions: {results['alpha']:.3f}",
            f"draft tokens kept: {results['acceptance_rate']:.3f} of those proposed (k = {k})",
            f"tokens per target forward: measured {results['tokens_per_round']:.2f}, "
            f"predicted (1 - alpha^{k + 1}) / (1 - alpha) = {results['predicted_tokens_per_round']:.2f}",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Train a target and a draft on the trigram language and compare measured and predicted acceptance."""
    parser = argparse.ArgumentParser(
        prog="python -m common.inference.acceptance",
        description=__doc__.split("\n\n")[0],
        epilog="example: python -m common.inference.acceptance --draft-len 2 --temperature 0.7",
    )
    defaults = AcceptanceExperiment()
    parser.add_argument(
        "--target-steps", type=int, default=defaults.target_steps, help="training steps of the target"
    )
    parser.add_argument(
        "--draft-steps", type=int, default=defaults.draft_steps, help="training steps of the draft"
    )
    parser.add_argument(
        "--draft-len", type=int, default=defaults.draft_len, help="draft tokens per round (k)"
    )
    parser.add_argument(
        "--temperature", type=float, default=defaults.temperature, help="sampling temperature"
    )
    parser.add_argument(
        "--prompts", type=int, default=defaults.n_prompts, help="number of prompts generated from"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=defaults.new_tokens, help="tokens generated per prompt"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    experiment = AcceptanceExperiment(
        target_steps=args.target_steps,
        draft_steps=args.draft_steps,
        draft_len=args.draft_len,
        temperature=args.temperature,
        n_prompts=args.prompts,
        new_tokens=args.new_tokens,
        seed=args.seed,
    )
    print(report(run(experiment), experiment))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
