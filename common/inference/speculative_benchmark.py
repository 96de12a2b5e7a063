"""Week-9 benchmark: greedy speculative decoding against plain greedy decoding, in tokens/s, on one GPU.

    run_speculative_benchmark(Path("benchmarks/results/nvidia-h200"))     # `effdl bench speculative`
    record = measure(SpeculativeBenchmark.quick(), torch.device("cpu"))  # the same, tiny, no file

The models. Speculative decoding pays when a target forward over k + 1 tokens costs about what one over one
token does (decoding at batch 1 is memory-bound: the weights are read once either way) and the draft's
forward costs a small fraction c of the target's, while the draft agrees with the target often. So the target
is wide (Llama-3-8B's layer shape, 16 of its 32 layers, 3.51 billion parameters, 14 GB in fp32: a step streams
them from memory) and the draft is its own first layer, with its embedding, final norm and output
(`layer_draft`): 0.23 billion parameters, 0.07 of the target's (about what a 1B draft is to a 13B target),
and, run in bf16, 0.03 of its bytes.
Each round also pays the host a fixed cost (a sync to read how many tokens were kept, then the next
launches), which a deeper target makes a smaller share of the round. The target is random: speed does not
depend on the weights' values, only on how often the draft is right. Its later layers are made quiet (`quiet_late_layers`: their
residual outputs wo and w2 scaled by late_layer_scale), so that its first layer, the draft, decides the
target's greedy choice most of the time, not always, as a good small model of the same family does;
training a target of this size until a one-layer draft agrees with it would cost more than the whole run.
How often the draft is right is measured (alpha, below) and reported beside the speed. The assignment's
speed task builds its models the same way (its draft: two layers, in fp32).

The machinery. Both sides use one `CachedDecoder` per model (the same static KV cache, reset between runs)
and the same library functions: `generate` for plain decoding, `speculative_generate` for speculative
decoding. Plain decoding is timed eager and compiled with CUDA graphs (`GraphedDecoder`: torch.compile's
kernels in one hand-captured graph per input length), and whichever is faster is the baseline; speculative
decoding then runs on that same machinery (graphed target and draft, or eager ones), so the comparison is
the best plain decoding we have against speculative decoding built from the same parts. A round ends with
a sync (how many tokens were kept?), after which the GPU waits for the host's next launches; hand-captured
graphs keep that short (`GraphedDecoder` says why they beat reduce-overhead's CUDA graphs, and when it
matters). The decoders compile with dynamic shapes: a few compilations
serve every length (prefill, one token, the k + 1 tokens a round verifies) instead of one per draft length.

The draft runs in bf16 (`draft_dtype`): it only proposes, and the target checks every token in fp32, so
the output is the same whatever the draft computes in, and a draft step reads half the bytes. On one H100
(benchmarks/results/nvidia-h100-80gb-hbm3/) speculative decoding reached 2.11x plain decoding at k = 5 with
the bf16 draft (inference_speculative.json), and 1.94x at its best k with the same draft in fp32
(inference_speculative_fp32_draft.json). The draft's rounding changes which tokens it proposes a little
(alpha 0.781 in bf16 against 0.773 in fp32): alpha is always measured with the draft as it runs.

Exactness. fp32 weights and activations, so that a forward over k + 1 tokens and one over a single token
give logits ~1e-5 apart: their argmax then differs only at a near-tie. The benchmark checks that speculative
decoding returned exactly plain decoding's tokens; where they differ, it checks, as the assignment's hidden
test does, that every token of both outputs is the target's greedy choice given the tokens before it, in one
forward of the whole sequence, up to NEAR_TIE in the logits (far above the 1e-5 and far below the gap a wrong
token leaves), and says so in the results. In bf16 the two forwards differ by ~1e-2, and a random model's
top two logits are that close every few dozen tokens: the outputs would part ways for rounding alone.

Timing. For each draft length k, plain and speculative generation of `new_tokens` tokens from the same prompt
alternate in one process (common.bench.compare: CUDA events, medians, the median of per-pair ratios);
tokens/s is new_tokens over the median time of a whole generation, prefill included. Beside the speed:
alpha, the fraction of the generated positions where the draft's greedy choice is the target's (both
models run over plain decoding's output), the tokens per round measured, and the formula
(1 - alpha^(k+1)) / (1 - alpha) (`expected_tokens_per_round`). Goal (the course's issue): at least 2.0x
plain decoding's tokens/s at the best k. quick=True runs tiny models (on the GPU if there is one, else on
the CPU, where nothing is compiled): a check that everything runs, saved as inference_speculative_quick.json.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from common.bench import Comparison, compare, environment, save_results
from common.hardware import benchmark_device
from common.inference.acceptance import mean_alpha
from common.inference.generate import generate
from common.inference.graphed_decoder import GraphedDecoder
from common.inference.kv_cache import CachedDecoder
from common.inference.sampling import GREEDY
from common.inference.speculative import SpeculativeStats, expected_tokens_per_round, speculative_generate
from common.models.llama import Llama, LlamaConfig, count_parameters
from common.tables import format_table

__all__ = [
    "GOAL_SPEEDUP",
    "GRAPHED",
    "NEAR_TIE",
    "SpeculativeBenchmark",
    "draft_length_row",
    "greedy_violations",
    "layer_draft",
    "measure",
    "quiet_late_layers",
    "run_speculative_benchmark",
    "speedup_goal",
]

GOAL_SPEEDUP = 2.0  # greedy speculative tokens/s over plain greedy decoding, the best draft length
# Logit gap below which two tokens count as a tie: fp32 forwards over 1 and over k + 1 tokens differ by ~1e-5.
NEAR_TIE = 1e-3
GRAPHED = "compiled, one CUDA graph per input length"  # the record's machinery when GraphedDecoder is faster


@dataclass
class SpeculativeBenchmark:
    """Models, lengths and timing budgets; the defaults are the GPU run, `quick()` the tiny one."""

    # Llama-3-8B's layer (width 4096, 32 query and 8 kv heads, SwiGLU 14336), 16 of them, a small vocabulary
    # so that the output layer (which the draft shares) does not dominate the draft's cost.
    target: LlamaConfig = field(
        default_factory=lambda: LlamaConfig(
            vocab_size=2048, d_model=4096, n_layers=16, n_heads=32, n_kv_heads=8, d_ff=14336, max_seq_len=256
        )
    )
    draft_layers: int = 1  # the draft: the target's first draft_layers layers
    # The draft's precision: it only proposes (the target checks every token in fp32), so it may be cheaper.
    draft_dtype: str = "bfloat16"
    # wo and w2 of the target's later layers are scaled by this. Random directions add up as sqrt(n): 15
    # quiet layers at 0.025 move the residual stream about as much as 7 at 0.05 would (0.10 against 0.13).
    late_layer_scale: float = 0.025
    draft_lens: tuple[int, ...] = (2, 4, 5, 6, 8)  # on an H100, k = 5 was best
    prompt_len: int = 16
    new_tokens: int = 128
    compile: bool = True  # also time compiled decoding replayed as CUDA graphs; on a GPU only
    warmup_ms: float = 300.0
    rep_ms: float = 1500.0
    seed: int = 0

    def __post_init__(self) -> None:
        n_layers = self.target.n_layers
        if not 1 <= self.draft_layers < n_layers:
            raise ValueError(
                f"draft_layers={self.draft_layers} must be in [1, {n_layers - 1}]: the draft is a strict "
                f"prefix of the target's {n_layers} layers"
            )
        if not self.draft_lens or any(k < 1 for k in self.draft_lens):
            raise ValueError(f"draft_lens must be one or more lengths >= 1, got {self.draft_lens}")
        if self.prompt_len < 1 or self.new_tokens < 1:
            raise ValueError(f"prompt_len={self.prompt_len} and new_tokens={self.new_tokens} must be >= 1")
        if self.max_len > self.target.max_seq_len:
            raise ValueError(
                f"prompt_len + new_tokens + max(draft_lens) - 1 = {self.max_len} positions exceed the target's "
                f"max_seq_len={self.target.max_seq_len}: shorten them or raise max_seq_len"
            )
        dtype = self.draft_torch_dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"draft_dtype must name a floating-point torch dtype, got {self.draft_dtype!r}")
        if not 0 < self.late_layer_scale <= 1:
            raise ValueError(f"late_layer_scale must be in (0, 1], got {self.late_layer_scale}")

    @property
    def draft_torch_dtype(self) -> torch.dtype:
        """torch.<draft_dtype>: after __post_init__'s check, always a floating-point dtype."""
        return getattr(torch, self.draft_dtype, None)

    @property
    def max_len(self) -> int:
        """Positions of each static cache: what the longest speculative round can reach."""
        return self.prompt_len + self.new_tokens + max(self.draft_lens) - 1

    @classmethod
    def quick(cls) -> SpeculativeBenchmark:
        """Tiny models and short timings: everything runs in seconds on a CPU."""
        return cls(
            target=LlamaConfig(
                vocab_size=64, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64
            ),
            draft_lens=(1, 2, 4),
            prompt_len=4,
            new_tokens=24,
            late_layer_scale=0.5,  # tiny models agree more easily: a draft that is often, not always, right
            warmup_ms=5.0,
            rep_ms=20.0,
        )


def quiet_late_layers(model: Llama, keep: int, scale: float) -> Llama:
    """Scale the residual outputs (attention's wo, the feed-forward's w2) of every layer after the first
    `keep` by `scale`, in place: those layers then add little to the residual stream, so the first `keep`
    decide the greedy choice most of the time."""
    with torch.no_grad():
        for layer in model.layers[keep:]:
            layer.attention.wo.weight.mul_(scale)
            layer.feed_forward.w2.weight.mul_(scale)
    return model


def layer_draft(target: Llama, n_layers: int) -> Llama:
    """A draft made of the target's first n_layers layers with its embedding, final norm and output (copies:
    the draft owns its weights, on the target's device and in its dtype)."""
    if not 1 <= n_layers < target.config.n_layers:
        raise ValueError(f"n_layers={n_layers} must be in [1, {target.config.n_layers - 1}]")
    weight = target.tok_embeddings.weight
    with torch.device(weight.device):
        draft = Llama(replace(target.config, n_layers=n_layers))
    # Copies the shared weights; the layers the draft lacks are left out (strict=False).
    missing, _ = draft.load_state_dict(target.state_dict(), strict=False)
    if missing:
        raise RuntimeError(f"the draft's {missing} have no counterpart in the target")
    return draft.to(weight.dtype).eval()


def greedy_violations(
    model: Llama, tokens: torch.Tensor, prompt_len: int, near_tie: float = NEAR_TIE
) -> list[int]:
    """Indices of the generated tokens (tokens (1, n), after the prompt) that are not `model`'s greedy choice
    given the tokens before them, in one forward of the whole sequence, by more than `near_tie` in the
    logits: empty for greedy decoding up to near-ties."""
    with torch.no_grad():
        logits = model(tokens[:, :-1])[0, prompt_len - 1 :].double()  # predictions of tokens prompt_len ...
    chosen = logits.gather(1, tokens[0, prompt_len:, None])[:, 0]
    short = logits.max(1).values - chosen  # 0 where the token is the argmax
    return (short > near_tie).nonzero()[:, 0].tolist()


def draft_length_row(
    draft_len: int,
    comparison: Comparison,
    stats: SpeculativeStats,
    alpha: float,
    new_tokens: int,
    identical: bool,
) -> dict[str, Any]:
    """One draft length's results: tokens/s of both sides (new_tokens over the median generation time), the
    speedup (median of per-pair ratios), the acceptance and tokens per round measured and predicted."""
    return {
        "draft_len": draft_len,
        "plain_tokens_per_s": new_tokens / (comparison.baseline.median_ms / 1e3),
        "speculative_tokens_per_s": new_tokens / (comparison.candidate.median_ms / 1e3),
        "speedup": comparison.speedup,
        "speedup_p20": comparison.speedup_p20,
        "speedup_p80": comparison.speedup_p80,
        "identical_tokens": identical,
        "rounds": stats.rounds,
        "acceptance_rate": stats.acceptance_rate,
        "tokens_per_round": stats.tokens_per_round,
        "predicted_tokens_per_round": expected_tokens_per_round(alpha, draft_len),
        "comparison": comparison,
    }


def speedup_goal(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The goal's entry: the best draft length's speedup against GOAL_SPEEDUP."""
    best = max(rows, key=lambda row: row["speedup"])
    return {
        "metric": "greedy speculative decoding's tokens/s over plain greedy decoding, best draft length",
        "op": ">=",
        "value": GOAL_SPEEDUP,
        "best_draft_len": best["draft_len"],
        "speedup": best["speedup"],
        "met": best["speedup"] >= GOAL_SPEEDUP,
    }


def build_models(bench: SpeculativeBenchmark, device: torch.device) -> tuple[Llama, Llama]:
    """The target (random, later layers quiet, fp32 on `device`) and its first-layers draft in draft_dtype."""
    torch.manual_seed(bench.seed)
    with torch.device(device):  # initialised where it runs: 14 GB need not cross from the host
        target = Llama(bench.target).eval()
    quiet_late_layers(target, bench.draft_layers, bench.late_layer_scale)
    draft = layer_draft(target, bench.draft_layers).to(bench.draft_torch_dtype)
    return target, draft


def _decoders(
    target: Llama, draft: Llama, max_len: int, compiled: bool
) -> tuple[CachedDecoder, CachedDecoder]:
    """Batch-1 decoders of both models: eager, or compiled and replayed as CUDA graphs (GraphedDecoder)."""
    decoder = GraphedDecoder if compiled else CachedDecoder
    return decoder(target, 1, max_len), decoder(draft, 1, max_len)


def _plain(target: Llama, prompt: torch.Tensor, new_tokens: int, decoder: CachedDecoder,
           out: dict[str, Any]) -> Callable[[], None]:  # fmt: skip
    def run() -> None:
        out["tokens"] = generate(target, prompt, new_tokens, decoder=decoder)

    return run


def _speculative(target: Llama, draft: Llama, prompt: torch.Tensor, new_tokens: int, draft_len: int,
                 decoders: tuple[CachedDecoder, CachedDecoder], out: dict[str, Any]) -> Callable[[], None]:  # fmt: skip
    def run() -> None:
        out["tokens"], out["stats"] = speculative_generate(
            target, draft, prompt, new_tokens, draft_len,
            target_decoder=decoders[0], draft_decoder=decoders[1],
        )  # fmt: skip

    return run


def _check_greedy(target: Llama, plain: torch.Tensor, speculative: torch.Tensor, prompt_len: int) -> bool:
    """Whether the speculative tokens are plain decoding's; if not, raise unless both are the target's greedy
    choices up to near-ties (see the module docstring)."""
    if torch.equal(plain, speculative):
        return True
    for name, tokens in (("plain", plain), ("speculative", speculative)):
        wrong = greedy_violations(target, tokens, prompt_len)
        if wrong:
            raise AssertionError(
                f"{name} decoding's new tokens {wrong[:5]} are not the target's greedy choices (each more than "
                f"{NEAR_TIE} below the best logit): speculative decoding must return the target's tokens"
            )
    return False


def measure(bench: SpeculativeBenchmark, device: torch.device) -> dict[str, Any]:
    """Build the models, time plain and speculative decoding for each draft length, check the tokens; the
    record that run_speculative_benchmark saves (without its environment)."""
    if torch.get_float32_matmul_precision() != "highest":
        raise ValueError(
            f"fp32 matmuls run at precision {torch.get_float32_matmul_precision()!r} (TF32 or bf16 rounding), "
            "which makes near-ties of the two outputs common: call "
            'torch.set_float32_matmul_precision("highest") first (PyTorch\'s default)'
        )
    target, draft = build_models(bench, device)
    prompt = torch.randint(
        bench.target.vocab_size,
        (1, bench.prompt_len),
        generator=torch.Generator().manual_seed(bench.seed + 1),
    ).to(device)
    # L2 left warm: a generation reads every weight once per step, far more than L2 holds, and flushing it
    # before each generation would change nothing but the run's length.
    timing = dict(warmup_ms=bench.warmup_ms, rep_ms=bench.rep_ms, cache="warm", device=device)
    eager = _decoders(target, draft, bench.max_len, compiled=False)
    plain_out: dict[str, Any] = {}
    machinery, plain_modes = "eager", None
    # One entry per compiled decoder and shape kind (prefill, one token, several): more than Dynamo's default 8.
    with torch._dynamo.config.patch(recompile_limit=64), torch.no_grad():
        decoders = eager
        if bench.compile and device.type == "cuda":
            compiled = _decoders(target, draft, bench.max_len, compiled=True)
            compiled_out: dict[str, Any] = {}
            plain_modes = compare(
                _plain(target, prompt, bench.new_tokens, eager[0], plain_out),
                _plain(target, prompt, bench.new_tokens, compiled[0], compiled_out),
                names=("plain decoding, eager", "plain decoding, CUDA graphs"),
                **timing,
            )
            if plain_modes.speedup > 1:  # compiled is faster: both sides use compiled decoders
                machinery, decoders, plain_out = GRAPHED, compiled, compiled_out
        if "tokens" not in plain_out:  # eager only: no comparison above has generated them yet
            _plain(target, prompt, bench.new_tokens, decoders[0], plain_out)()
        alpha = mean_alpha(target, draft, plain_out["tokens"], bench.prompt_len, GREEDY)
        rows = []
        for k in bench.draft_lens:
            spec_out: dict[str, Any] = {}
            comparison = compare(
                _plain(target, prompt, bench.new_tokens, decoders[0], plain_out),
                _speculative(target, draft, prompt, bench.new_tokens, k, decoders, spec_out),
                names=("plain decoding", f"speculative decoding, k={k}"),
                **timing,
            )
            identical = _check_greedy(target, plain_out["tokens"], spec_out["tokens"], bench.prompt_len)
            rows.append(
                draft_length_row(k, comparison, spec_out["stats"], alpha, bench.new_tokens, identical)
            )
    return {
        "benchmark": "inference_speculative",
        "description": "greedy speculative decoding against plain greedy decoding of the same target, the same "
        f"static KV cache, {machinery}, batch 1, fp32 target, {bench.draft_dtype} draft: tokens/s of whole "
        f"generations of {bench.new_tokens} tokens, timed alternately in one run",
        "config": asdict(bench),
        "models": {
            "target_parameters": count_parameters(bench.target),
            "draft_parameters": count_parameters(draft.config),
        },
        "machinery": machinery,
        "plain_eager_vs_compiled": plain_modes,
        "alpha": alpha,
        "draft_lengths": rows,
        "goal": speedup_goal(rows),
    }


def _summary(record: dict[str, Any]) -> str:
    """One row per draft length: tokens/s of both, speedup, tokens per round measured and predicted."""
    rows = [
        (
            str(row["draft_len"]),
            f"{row['plain_tokens_per_s']:.0f}",
            f"{row['speculative_tokens_per_s']:.0f}",
            f"{row['speedup']:.2f}x",
            f"{row['tokens_per_round']:.2f}",
            f"{row['predicted_tokens_per_round']:.2f}",
            "yes" if row["identical_tokens"] else "near-tie",
        )
        for row in record["draft_lengths"]
    ]
    header = [
        "k",
        "plain tokens/s",
        "speculative tokens/s",
        "speedup",
        "tokens/round",
        "formula",
        "same tokens",
    ]
    goal = record["goal"]
    return "\n".join([
        f"{record['machinery']}; alpha (draft's greedy choice = target's) = {record['alpha']:.3f}",
        format_table(header, rows),
        f"goal: >= {goal['value']}x at the best k ({goal['best_draft_len']}): "
        f"{goal['speedup']:.2f}x, {'met' if goal['met'] else 'NOT met'}",
    ])  # fmt: skip


def run_speculative_benchmark(out_dir: Path, quick: bool = False) -> list[Path]:
    """Measure greedy speculative decoding against plain decoding on this machine's GPU (or, quick, its CPU);
    save JSON."""
    device = benchmark_device(
        quick, "the week-9 speculative decoding benchmark measures decode speed on a GPU"
    )
    bench = SpeculativeBenchmark.quick() if quick else SpeculativeBenchmark()
    print(f"running the speculative decoding benchmark{' (quick)' if quick else ''} ...", flush=True)
    record = {**measure(bench, device), "quick": quick, "environment": environment(device)}
    path = save_results(record, Path(out_dir) / f"inference_speculative{'_quick' if quick else ''}.json")
    print(_summary(record))
    return [path]
