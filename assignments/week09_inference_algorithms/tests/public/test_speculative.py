"""Public tests of `fastinfer.speculative.speculative_greedy` (the hidden ones try more drafts and lengths, and
check the target's cache at every forward).

Tiny random Llamas in float64, so that a forward over several tokens and one over a single token give the same
argmax (their logits differ by ~1e-15, far below any gap between two logits).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from fastinfer.decoder import Decoder
from fastinfer.speculative import speculative_greedy

from common.inference.generate import generate
from common.models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig(vocab_size=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64)
PROMPT = torch.tensor([3, 1, 4, 1, 5])
NEW = 20


def random_llama(seed: int) -> Llama:
    torch.manual_seed(seed)
    model = Llama(CONFIG).double().eval()
    with torch.no_grad():
        model.output.weight.mul_(10.0)  # logits of std ~1: distinct greedy choices
    return model


def run(target_model: Llama, draft_model: Llama, draft_len: int) -> tuple[torch.Tensor, Decoder]:
    max_len = PROMPT.numel() + NEW + draft_len - 1
    target, draft = Decoder(target_model, max_len), Decoder(draft_model, max_len)
    return speculative_greedy(target, draft, PROMPT, NEW, draft_len), target


@pytest.mark.parametrize("draft_len", [1, 3])
def test_equals_greedy_decoding_of_the_target(draft_len: int) -> None:
    target_model, draft_model = random_llama(0), random_llama(1)  # a draft that rarely agrees
    tokens, _ = run(target_model, draft_model, draft_len)
    assert torch.equal(tokens, generate(target_model, PROMPT[None], NEW)[0])


def test_a_draft_that_always_agrees_needs_one_target_forward_per_draft_len_plus_one_tokens() -> None:
    target_model = random_llama(0)
    tokens, target = run(target_model, copy.deepcopy(target_model), draft_len=3)
    assert torch.equal(tokens, generate(target_model, PROMPT[None], NEW)[0])
    assert len(target.log) == math.ceil(NEW / 4), target.log
