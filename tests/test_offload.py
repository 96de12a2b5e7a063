"""common.memory.offload: parameter, optimizer-state and activation offload against the plain model.

On a CPU "offloading" copies between two CPU tensors, so the results must equal the plain model's bit for
bit: the hooks only move values, and the arithmetic is the same ops on the same values in the same order.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from common.memory.checkpointing import apply_activation_checkpointing, saved_activation_bytes
from common.memory.offload import (
    HostOptimizer,
    apply_parameter_offload,
    measure_offload,
    offload_activations,
    overlap,
    record_timeline,
)
from common.models.llama import Block, Llama, LlamaConfig

CONFIG = LlamaConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=16)
ADAMW = {"lr": 1e-2, "weight_decay": 0.1}
EXACT = {"rtol": 0, "atol": 0}


@dataclass
class Reference:
    model: Llama  # the initial weights, untouched
    inputs: torch.Tensor
    targets: torch.Tensor
    logits: torch.Tensor
    loss: torch.Tensor
    grads: dict[str, torch.Tensor]
    stepped: dict[str, torch.Tensor]  # parameters after one AdamW step
    logits_after_step: torch.Tensor


def _model(device: str = "cpu", config: LlamaConfig = CONFIG) -> Llama:
    torch.manual_seed(0)
    return Llama(config).to(device)


def _reference(model: Llama, inputs: torch.Tensor, targets: torch.Tensor) -> Reference:
    plain = copy.deepcopy(model)
    logits = plain(inputs)
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in plain.named_parameters()}
    torch.optim.AdamW(plain.parameters(), **ADAMW).step()
    with torch.no_grad():
        after = plain(inputs)
    stepped = {n: p.detach().clone() for n, p in plain.named_parameters()}
    return Reference(model, inputs, targets, logits.detach(), loss.detach(), grads, stepped, after)


@pytest.fixture(scope="module")
def ref() -> Reference:
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    return _reference(_model(), tokens[:, :-1], tokens[:, 1:])


def _loss(model: nn.Module, ref: Reference) -> tuple[torch.Tensor, torch.Tensor]:
    logits = model(ref.inputs)
    return logits, nn.functional.cross_entropy(logits.flatten(0, 1), ref.targets.flatten())


def _resident(model: nn.Module) -> list[bool]:
    """For each Block: does it hold its parameters' memory now?"""
    return [
        all(p.untyped_storage().nbytes() > 0 for p in b.parameters())
        for b in model.modules()
        if isinstance(b, Block)
    ]


@pytest.mark.parametrize("prefetch", [True, False])
def test_parameter_offload_gives_the_plain_models_results_and_step(ref: Reference, prefetch: bool) -> None:
    model = copy.deepcopy(ref.model)
    offload = apply_parameter_offload(model, "cpu", prefetch=prefetch)
    assert _resident(model) == [False] * CONFIG.n_layers  # between uses no block holds memory

    seen = []  # which blocks hold their weights while block i computes
    spies = [
        block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, _resident(model))))
        for i, block in enumerate(model.layers)
    ]
    logits, loss = _loss(model, ref)
    for spy in spies:
        spy.remove()
    for i, resident in seen:
        # Block i is in; with prefetch the next one is on its way too, and nothing else is held.
        expect = [j == i or (prefetch and j == i + 1) for j in range(CONFIG.n_layers)]
        assert resident == expect, (i, resident)
    torch.testing.assert_close(logits, ref.logits, **EXACT)
    torch.testing.assert_close(loss, ref.loss, **EXACT)

    loss.backward()
    assert _resident(model) == [False] * CONFIG.n_layers  # freed again after backward
    names = dict(model.named_parameters())
    grads = {n: offload.masters[n].grad if n in offload.masters else p.grad for n, p in names.items()}
    assert all(names[n].grad is None for n in offload.masters)  # block gradients went to the host
    assert grads.keys() == ref.grads.keys()
    for n, g in grads.items():
        torch.testing.assert_close(g, ref.grads[n], **EXACT, msg=n)

    torch.optim.AdamW(offload.parameters(), **ADAMW).step()
    with torch.no_grad():
        torch.testing.assert_close(model(ref.inputs), ref.logits_after_step, **EXACT)

    offload.remove()
    for block in model.layers:
        assert not block._forward_pre_hooks and not block._forward_hooks
        assert all(not p._post_accumulate_grad_hooks for p in block.parameters())
    assert _resident(model) == [True] * CONFIG.n_layers
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref.stepped[n], **EXACT, msg=n)


def test_parameter_offload_accumulates_gradients_over_two_backwards(ref: Reference) -> None:
    model = copy.deepcopy(ref.model)
    offload = apply_parameter_offload(model, "cpu")
    for _ in range(2):
        _loss(model, ref)[1].backward()
    for n, master in offload.masters.items():
        torch.testing.assert_close(master.grad, 2 * ref.grads[n], **EXACT, msg=n)  # 2x is exact in binary


def test_host_optimizer_steps_like_adamw(ref: Reference) -> None:
    model = copy.deepcopy(ref.model)
    optimizer = HostOptimizer(model.parameters(), **ADAMW)
    assert all(h is not p for h, p in zip(optimizer.hosts, optimizer.params, strict=True))  # the copy path
    _loss(model, ref)[1].backward()
    optimizer.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref.stepped[n], **EXACT, msg=n)
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert optimizer.state_bytes("cpu") >= 2 * param_bytes  # exp_avg and exp_avg_sq, on the host


def test_all_three_offloads_together_step_like_the_plain_model(ref: Reference) -> None:
    plain = copy.deepcopy(ref.model)
    with offload_activations(plain) as alone:  # activation offload of the plain model, for its bytes
        _loss(plain, ref)
    model = copy.deepcopy(ref.model)
    offload = apply_parameter_offload(model, "cpu")
    optimizer = HostOptimizer(offload.parameters(), **ADAMW)
    with offload_activations(model) as hooks:
        _, loss = _loss(model, ref)
    loss.backward()
    optimizer.step()
    # Streamed weights are still recognised as weights (by storage, not by address): none is offloaded.
    assert hooks.bytes_offloaded == alone.bytes_offloaded
    offload.remove()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref.stepped[n], **EXACT, msg=n)


def test_activation_offload_matches_the_plain_model_and_save_on_cpu(ref: Reference) -> None:
    model = copy.deepcopy(ref.model)
    weights = {p.untyped_storage()._cdata for p in model.parameters()}
    with offload_activations(model) as hooks:
        logits, loss = _loss(model, ref)
    loss.backward()
    torch.testing.assert_close(logits, ref.logits, **EXACT)
    torch.testing.assert_close(loss, ref.loss, **EXACT)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref.grads[n], **EXACT, msg=n)
    torch.optim.AdamW(model.parameters(), **ADAMW).step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref.stepped[n], **EXACT, msg=n)

    # Everything autograd saves, counted by a plain pair of hooks: the offload moved all of it but weights.
    saved = {"weights": 0, "others": 0}

    def count(t: torch.Tensor) -> torch.Tensor:
        saved["weights" if t.untyped_storage()._cdata in weights else "others"] += (
            t.numel() * t.element_size()
        )
        return t

    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        _loss(model, ref)
    assert saved["weights"] > 0 and hooks.bytes_offloaded == saved["others"] > 0

    model = copy.deepcopy(ref.model)
    with torch.autograd.graph.save_on_cpu():
        _, loss = _loss(model, ref)
    loss.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref.grads[n], **EXACT, msg=n)


def test_offload_refuses_what_it_cannot_do() -> None:
    with pytest.raises(TypeError, match="Sequential has none; pass a common.models.llama.Llama"):
        apply_parameter_offload(nn.Sequential(nn.Linear(4, 4)), "cpu")
    with pytest.raises(ValueError, match="device='meta'"):
        apply_parameter_offload(_model(), "meta")
    model = _model()
    apply_parameter_offload(model, "cpu")
    with pytest.raises(ValueError, match="offloaded already"):
        apply_parameter_offload(model, "cpu")
    with pytest.raises(ValueError, match="apply one or the other"):
        apply_parameter_offload(apply_activation_checkpointing(_model(), "full"), "cpu")
    with pytest.raises(ValueError, match="variant='disk'"):
        measure_offload(CONFIG, 1, 8, variants=("disk",), device="cpu")


def test_overlap_of_copy_and_compute_intervals() -> None:
    # copies: [0, 2] and [1, 3] merge to [0, 3] (3 ms); compute [2, 5] and [6, 7] (4 ms);
    # both at once: [2, 3] = 1 ms; span 0 -> 7.
    o = overlap([(0.0, 2.0), (1.0, 3.0)], [(6.0, 7.0), (2.0, 5.0)])
    assert (o.copy_ms, o.compute_ms, o.overlap_ms, o.span_ms) == (3.0, 4.0, 1.0, 7.0)
    assert o.hidden == pytest.approx(1 / 3)
    assert overlap([(0.0, 1.0)], [(1.0, 2.0)]).overlap_ms == 0.0  # touching is not overlapping


def test_measure_offload_runs_every_variant_on_cpu() -> None:
    results = measure_offload(
        CONFIG, 1, 8, device="cpu", dtype=torch.float32, warmup_ms=0, rep_ms=0, min_reps=1
    )
    assert list(results) == ["none", "offload", "offload+prefetch", "activations"]
    assert all(r.step_ms > 0 and r.tokens_per_s > 0 and r.peak_memory_bytes is None for r in results.values())


# ----------------------------------------------------------------------------------------------------
# GPU: the memory each technique saves, and the same results
# ----------------------------------------------------------------------------------------------------

# Weights dominate: 8 blocks of ~11.8M parameters (47 MB in fp32 each), few activations (1 x 64 tokens).
BIG_WEIGHTS = LlamaConfig(
    vocab_size=256, d_model=1024, n_layers=8, n_heads=8, n_kv_heads=4, d_ff=2816, max_seq_len=64
)


def _peak(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    context: contextlib.AbstractContextManager | None = None,
) -> int:
    """Peak device memory over forward+backward, everything resident included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    with context or contextlib.nullcontext():
        loss = model.loss(inputs, targets)
    loss.backward()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


@pytest.mark.gpu
@pytest.mark.parametrize("prefetch", [True, False])
def test_parameter_offload_on_cuda_stays_under_a_budget_the_plain_model_exceeds(prefetch: bool) -> None:
    tokens = torch.randint(0, 256, (1, 65), generator=torch.Generator().manual_seed(0)).cuda()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    plain = _model("cuda", BIG_WEIGHTS)
    plain_peak = _peak(plain, inputs, targets)
    plain_grads = {n: p.grad.cpu() for n, p in plain.named_parameters()}  # off the GPU: not in the next peak
    del plain
    model = _model("cpu", BIG_WEIGHTS)
    offload = apply_parameter_offload(model, "cuda", prefetch=prefetch)
    peak = _peak(model, inputs, targets)
    # Budget: at most 3 blocks' worth of weights and gradients on the GPU (the computing block's weights
    # and gradients, the prefetched block's weights), twice that allowed, plus everything outside the
    # blocks, against all 8 blocks' weights and gradients for the plain model.
    block_bytes = sum(p.numel() * 4 for p in model.layers[0].parameters())
    budget = plain_peak - 8 * 2 * block_bytes + 3 * 2 * block_bytes
    assert peak < budget < plain_peak, (peak, budget, plain_peak)
    for n, g in plain_grads.items():
        got = offload.masters[n].grad if n in offload.masters else dict(model.named_parameters())[n].grad
        # Same kernels on the same values; only cuBLAS's choice of algorithm may differ between the runs.
        torch.testing.assert_close(got.cpu(), g, rtol=1e-4, atol=1e-6, msg=n)


@pytest.mark.gpu
def test_activation_offload_on_cuda_lowers_the_peak_and_keeps_gradients() -> None:
    config = LlamaConfig(
        vocab_size=256, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=704, max_seq_len=1024
    )
    tokens = torch.randint(0, 256, (8, 1025), generator=torch.Generator().manual_seed(0)).cuda()
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    model = _model("cuda", config)
    activations = saved_activation_bytes(model, inputs)  # what the plain model holds for backward
    plain_peak = _peak(model, inputs, targets)
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    hooks = offload_activations(model)
    peak = _peak(model, inputs, targets, hooks)
    # The activations leave the GPU: only the tensors of the op at hand are there at any time (a few
    # d_ff-wide tensors of one block), against all blocks' activations (~670 MB here) for the plain model.
    assert peak < plain_peak - activations / 2, (peak, plain_peak, activations)
    assert hooks.bytes_offloaded >= activations / 2  # a tensor saved by two ops is copied twice
    for g, ref in zip((p.grad for p in model.parameters()), plain_grads, strict=True):
        torch.testing.assert_close(g, ref, rtol=1e-5, atol=1e-6)  # copies only; same kernels


@pytest.mark.gpu
def test_host_optimizer_on_cuda_keeps_states_on_the_host_and_steps_like_adamw() -> None:
    model, plain = _model("cuda"), _model("cuda")
    inputs = torch.randint(0, 64, (2, 8), device="cuda")
    for m in (model, plain):
        m.loss(inputs, inputs).backward()
    optimizer = HostOptimizer(model.parameters(), **ADAMW)
    optimizer.step()
    torch.optim.AdamW(plain.parameters(), **ADAMW).step()
    assert optimizer.state_bytes("cuda") == 0 and optimizer.state_bytes("cpu") > 0
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        # The CPU's and the GPU's sqrt and fused multiply-adds round differently: fp32 noise only.
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_prefetch_copies_overlap_compute_in_the_profile(tmp_path) -> None:
    model = _model("cpu", BIG_WEIGHTS)
    offload = apply_parameter_offload(model, "cuda", prefetch=True)
    tokens = torch.randint(0, 256, (4, 65), device="cuda")

    def step() -> None:
        model.loss(tokens[:, :-1], tokens[:, 1:]).backward()
        for p in offload.parameters():
            p.grad = None

    o = record_timeline(step, trace_path=tmp_path / "offload.json")
    assert o.copy_ms > 0 and o.compute_ms > 0 and o.overlap_ms > 0, str(o)
    assert (tmp_path / "offload.json").exists()
