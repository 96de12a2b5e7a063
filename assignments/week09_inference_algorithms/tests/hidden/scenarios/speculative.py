"""Runs in the submission's worker: the student's speculative decoding on two logged decoders.

The decoders are `fastinfer.decoder.Decoder`s (the course's file, copied from the starter, never the
student's): each logs every extend, the position it started at and the tokens it ran. The scenario returns
the tokens and the target's log; the checker computes greedy decoding, the number of rounds greedy
speculative decoding takes and the cache's contents at each forward itself.

Before the submission is imported, `common.inference.speculative` (the course's own implementation) is
refused. That states the rule (see common.grading.off_limits); what makes the library useless is the
interface: 1-D sequences, `extend`/`truncate`/`len` instead of CachedDecoder's `feed`/`rollback`/`length`.

The models are built here, from a seed, so that the checker builds the very same ones by calling the same
functions: tiny random Llamas in float64 on the CPU (a forward over several tokens and one over a single
token then give logits ~1e-15 apart, so their argmaxes agree) and, for the GPU task, a deep target and a
shallow draft that shares its first layers, in float32 on the GPU.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from common.grading.off_limits import refuse_imports
from common.models.llama import Llama, LlamaConfig

OFF_LIMITS = ("common.inference.speculative",)
REASON = "write the draft-and-verify loop yourself over the Decoder interface"
CONFIG = LlamaConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
DRAFTS = ("same", "close", "other")  # a copy of the target, a perturbed copy, an unrelated model


def random_llama(seed: int, config: LlamaConfig = CONFIG, dtype: torch.dtype = torch.float64) -> Llama:
    """A random Llama whose output projection is scaled by 10: logits of std ~1, so greedy choices are
    distinct (at the default init they hang on gaps of ~1e-3)."""
    torch.manual_seed(seed)
    model = Llama(config).to(dtype).eval()
    with torch.no_grad():
        model.output.weight.mul_(10.0)
    return model


def models(seed: int, draft: str) -> tuple[Llama, Llama]:
    """(target, draft) for a draft kind of DRAFTS. "close" adds noise of 0.2 times each weight's std: a draft
    whose proposals the target keeps about half the time."""
    target = random_llama(seed)
    if draft == "same":
        return target, copy.deepcopy(target)
    if draft == "other":
        return target, random_llama(seed + 1)
    if draft != "close":
        raise ValueError(f"unknown draft kind {draft!r}; one of {DRAFTS}")
    close, generator = copy.deepcopy(target), torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for param in close.parameters():
            param.add_(torch.randn(param.shape, generator=generator, dtype=param.dtype) * param.std() * 0.2)
    return target, close


def _decode(target_model: Llama, draft_model: Llama, prompt: list[int], max_new_tokens: int,
            draft_len: int) -> dict:  # fmt: skip
    refuse_imports(OFF_LIMITS, REASON)
    from fastinfer.decoder import Decoder
    from fastinfer.speculative import speculative_greedy

    max_len = len(prompt) + max_new_tokens + draft_len - 1
    target, draft = Decoder(target_model, max_len), Decoder(draft_model, max_len)
    device = target_model.output.weight.device
    tokens = speculative_greedy(target, draft, torch.tensor(prompt, device=device), max_new_tokens, draft_len)
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.cpu()
    return {"tokens": tokens, "target_log": [[start, ran.tolist()] for start, ran in target.log],
            "target_length": len(target)}  # fmt: skip


def decode(seed: int, draft: str, prompt: list[int], max_new_tokens: int, draft_len: int) -> dict:
    """speculative_greedy on the models of (seed, draft): the tokens it returned, the target's log of extends
    ([start, tokens] each) and the target's cache length at the end."""
    return _decode(*models(seed, draft), prompt, max_new_tokens, draft_len)


# ------------------------------------------------------------------------------------- the GPU task
# Small enough to be launch-bound on a GPU in eager mode (as decoding a batch of one is), so that a forward over
# draft_len + 1 tokens costs what a forward over one does, and the draft's cost is its share of the launches.
SPEED_CONFIG = LlamaConfig(
    vocab_size=1024, d_model=512, n_layers=16, n_heads=8, n_kv_heads=2, d_ff=1408, max_seq_len=256
)
SPEED_DRAFT_LAYERS = 2
LATE_LAYER_SCALE = 0.02  # the draft then keeps most proposals: tests/test_assignments.py checks how many
_ON_GPU: dict[str, Llama] = {}  # models built by prepare_speed, kept for the timed calls


def speed_models(seed: int, device: str) -> tuple[Llama, Llama]:
    """A 16-layer target and a 2-layer draft, float32 on `device`. The draft is the target's first two layers
    (with its embedding, final norm and output); the target's later layers add little to the residual stream
    (their wo and w2 scaled by LATE_LAYER_SCALE), so the draft guesses the target's greedy choice most of the
    time but not always, as a good small model of the same family does (tests/test_assignments.py measures
    how often). Decoding one token costs the target ~8 times the draft's work and kernel launches."""
    target = random_llama(seed, SPEED_CONFIG, torch.float32)
    with torch.no_grad():
        for layer in target.layers[SPEED_DRAFT_LAYERS:]:
            layer.attention.wo.weight.mul_(LATE_LAYER_SCALE)
            layer.feed_forward.w2.weight.mul_(LATE_LAYER_SCALE)
    draft = Llama(replace(SPEED_CONFIG, n_layers=SPEED_DRAFT_LAYERS)).eval()
    draft.load_state_dict(target.state_dict(), strict=False)  # the layers it lacks are left out
    return target.to(device), draft.to(device)


def prepare_speed(seed: int) -> None:
    """Build the GPU models once; the timed calls of decode_speed reuse them."""
    _ON_GPU["target"], _ON_GPU["draft"] = speed_models(seed, "cuda")


def decode_speed(prompt: list[int], max_new_tokens: int, draft_len: int) -> dict:
    """decode() on the models of prepare_speed (the checker times the whole call from its side)."""
    seen = _decode(_ON_GPU["target"], _ON_GPU["draft"], prompt, max_new_tokens, draft_len)
    torch.cuda.synchronize()
    return seen
