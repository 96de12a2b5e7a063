"""common.memory.checkpointing: full and selective activation checkpointing against the plain model."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from common.memory.checkpointing import (
    CheckpointedBlock,
    OpCounter,
    apply_activation_checkpointing,
    measure_checkpointing,
    saved_activation_bytes,
)
from common.models.llama import Llama, LlamaConfig

CONFIG = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
BATCH, SEQ = 2, 8
MODES = ("none", "selective", "full")


@dataclass
class Run:
    logits: torch.Tensor
    loss: torch.Tensor
    grads: list[torch.Tensor]
    saved_bytes: int
    backward_matmuls: int
    backward_attention: int


def _model(mode: str, config: LlamaConfig = CONFIG) -> Llama:
    torch.manual_seed(0)
    model = Llama(config)
    return model if mode == "none" else apply_activation_checkpointing(model, mode)


def _run(model: Llama, inputs: torch.Tensor, targets: torch.Tensor) -> Run:
    saved = saved_activation_bytes(model, inputs)
    logits = model(inputs)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    with OpCounter() as ops:
        loss.backward()
    grads = [p.grad for p in model.parameters()]
    return Run(logits.detach(), loss.detach(), grads, saved, ops.matmuls, ops.attention)


@pytest.fixture(scope="module")
def runs() -> dict[str, Run]:
    tokens = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    return {mode: _run(_model(mode), tokens[:, :-1], tokens[:, 1:]) for mode in MODES}


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_checkpointing_gives_the_plain_models_logits_loss_and_gradients(
    runs: dict[str, Run], mode: str
) -> None:
    # Exact: on a CPU, recomputing runs the same kernels on the same inputs in the same order, so it
    # reproduces every bit; selective checkpointing hands back the very matmul outputs of the forward.
    plain, ckpt = runs["none"], runs[mode]
    torch.testing.assert_close(ckpt.logits, plain.logits, rtol=0, atol=0)
    torch.testing.assert_close(ckpt.loss, plain.loss, rtol=0, atol=0)
    assert len(ckpt.grads) == len(plain.grads) == len(list(_model("none").parameters()))
    for g, ref in zip(ckpt.grads, plain.grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=0, atol=0)


def test_saved_activations_shrink_by_what_each_mode_drops(runs: dict[str, Run]) -> None:
    # What a Block keeps for backward besides its input x, per token, in fp32 elements (4 bytes):
    # - plain: per RMSNorm the rsqrt statistic (1), x * rsqrt (d) and its product with the weight, the
    #   next matmul's input (d); q after rotary (d) and k, v repeated to n_heads (d each), attention's output
    #   (d) and log-sum-exp (n_heads); the residual sum between the halves (d); w1's and w3's outputs, silu's
    #   output and the gated product (d_ff each): 2 + 9d + n_heads + 4 d_ff. Not kept: q and k before
    #   rotary (multiplied by cos/sin, which need no gradient), the reshape before wo (a view: SDPA lays its
    #   output out as (b, s, heads, head_dim)), the outputs of wo and w2 (they go into additions).
    # - selective: the matmul outputs q (d), k, v (kv each), wo (d), w1, w3 (d_ff each), w2 (d), and
    #   attention's output (d) and log-sum-exp (n_heads): 4d + 2 kv + n_heads + 2 d_ff.
    # - full: nothing beyond x.
    # Everything outside the blocks (embedding output, final norm, logits) is the same in every mode.
    c, n = CONFIG, BATCH * SEQ  # n tokens
    d, kv, h, ff = c.d_model, c.n_kv_heads * c.head_dim, c.n_heads, c.d_ff
    plain = c.n_layers * n * (2 + 9 * d + h + 4 * ff) * 4
    selective = c.n_layers * n * (4 * d + 2 * kv + h + 2 * ff) * 4
    assert runs["none"].saved_bytes - runs["full"].saved_bytes == plain
    assert runs["selective"].saved_bytes - runs["full"].saved_bytes == selective
    assert runs["none"].saved_bytes > runs["selective"].saved_bytes > runs["full"].saved_bytes


def test_selective_reruns_no_matmul_and_full_reruns_every_block_matmul(runs: dict[str, Run]) -> None:
    # Backward of a plain model runs two matmuls per forward matmul (gradients of input and weight): the
    # plain count is the baseline, and whatever a mode runs beyond it was recomputed.
    matmuls_per_block = 7  # wq, wk, wv, wo, w1, w3, w2
    plain = runs["none"]
    assert plain.backward_matmuls == 2 * (CONFIG.n_layers * matmuls_per_block + 1)  # + the output layer
    assert runs["selective"].backward_matmuls - plain.backward_matmuls == 0
    assert runs["selective"].backward_attention == plain.backward_attention == 0
    # Full reruns a block's forward only as far as backward needs it (use_reentrant=False stops early):
    # w2's output goes straight into the residual add, which saves nothing, so w2 is not rerun.
    rerun = CONFIG.n_layers * (matmuls_per_block - 1)
    assert runs["full"].backward_matmuls - plain.backward_matmuls == rerun
    assert runs["full"].backward_attention == CONFIG.n_layers  # one attention forward per block, rerun


def test_wrapping_replaces_each_block_and_refuses_bad_input() -> None:
    model = _model("selective")
    assert all(isinstance(layer, CheckpointedBlock) and layer.mode == "selective" for layer in model.layers)
    with pytest.raises(ValueError, match="checkpointed already"):
        apply_activation_checkpointing(model, "full")
    with pytest.raises(ValueError, match="mode='partial' is not one of 'full', 'selective'"):
        apply_activation_checkpointing(_model("none"), "partial")
    with pytest.raises(TypeError, match="has none; pass a common.models.llama.Llama"):
        apply_activation_checkpointing(nn.Sequential(nn.Linear(4, 4)), "full")


def test_measure_checkpointing_reports_each_mode_on_cpu() -> None:
    results = measure_checkpointing(
        CONFIG,
        BATCH,
        SEQ,
        modes=("none", "full"),
        device="cpu",
        dtype=torch.float32,
        warmup_ms=0,
        rep_ms=0,
        min_reps=1,
    )
    assert list(results) == ["none", "full"]
    assert results["none"].saved_activation_bytes > results["full"].saved_activation_bytes
    assert all(r.step_ms > 0 and r.peak_memory_bytes is None for r in results.values())
    with pytest.raises(ValueError, match="mode='half'"):
        measure_checkpointing(CONFIG, BATCH, SEQ, modes=("half",), device="cpu")


@pytest.mark.gpu
def test_checkpointing_on_cuda_in_bf16_lowers_the_peak_and_keeps_gradients() -> None:
    config = LlamaConfig(
        vocab_size=256, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=512
    )
    tokens = torch.randint(0, config.vocab_size, (8, 513), generator=torch.Generator().manual_seed(0)).cuda()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    peaks, grads = {}, {}
    for mode in MODES:
        model = _model(mode, config).to("cuda", torch.bfloat16)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model.loss(inputs, targets).backward()
        torch.cuda.synchronize()
        peaks[mode] = torch.cuda.max_memory_allocated() - base
        grads[mode] = [p.grad.float() for p in model.parameters()]
        del model
    assert peaks["none"] > peaks["selective"] > peaks["full"], peaks
    for mode in ("selective", "full"):
        for g, ref in zip(grads[mode], grads["none"], strict=True):
            # Recomputed matmuls are bitwise repeatable, but attention's backward may sum in another order
            # between runs: allow a couple of bf16 roundings (bf16 eps = 2**-8 ≈ 0.0039).
            torch.testing.assert_close(g, ref, rtol=1e-2, atol=1e-3)
