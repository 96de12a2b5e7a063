"""common.memory.anatomy: the predicted memory of a training step against the real tensors.

On CPU: the parameter, gradient and optimizer-state terms against the tensors after one AdamW step; the
activation formula against the bytes autograd really saves (saved-tensor hooks), for several shapes, with
and without full checkpointing, two attention implementations, fp32, bf16 parameters and bf16 autocast.
Both sides count bytes of whole tensors, so they must agree exactly: a wrong term is off by a multiple of
a tensor's size, never by rounding.
On a GPU: the same activation count for CUDA's flash and memory-efficient attention, and the predicted peak
of a whole step against torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from common.memory.anatomy import measure_saved_activations, measure_step_memory, predict_step_memory
from common.models.llama import Llama, LlamaConfig

CONFIGS = {
    "gqa": LlamaConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=48, max_seq_len=16
    ),
    "mha-tied": LlamaConfig(
        vocab_size=50,
        d_model=48,
        n_layers=3,
        n_heads=6,
        n_kv_heads=6,
        d_ff=80,
        max_seq_len=16,
        tie_embeddings=True,
    ),
    "mqa": LlamaConfig(
        vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=1, d_ff=64, max_seq_len=16
    ),
}
BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


class Checkpointed(nn.Module):
    """A block recomputed in the backward: only its inputs are kept."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.block, *args, use_reentrant=False)


def build(
    config: LlamaConfig, checkpointing: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> Llama:
    torch.manual_seed(0)
    model = Llama(config).to(device, dtype)
    if checkpointing == "full":
        model.layers = nn.ModuleList(Checkpointed(block) for block in model.layers)
    return model


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["gqa", "mha-tied"])
def test_state_terms_equal_the_tensors_after_one_adamw_step(name: str, param_dtype: torch.dtype):
    config = CONFIGS[name]
    model = build(config, "none", dtype=param_dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(config.vocab_size, (2, 12))
    model.loss(tokens, tokens).backward()
    optimizer.step()
    predicted = predict_step_memory(config, 2, 12, param_dtype=param_dtype)
    assert predicted.parameters == tensor_bytes(model.parameters())  # a tied matrix is one parameter
    assert predicted.buffers == tensor_bytes(model.buffers())
    assert predicted.gradients == tensor_bytes(p.grad for p in model.parameters())
    # exp_avg and exp_avg_sq per parameter; the step counters (one 0-dim fp32 tensor per parameter, kept on
    # the host by the non-fused AdamW) are not device memory and not counted.
    states = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    assert predicted.optimizer_states == tensor_bytes(states)


CASES = [  # (checkpointing, attention, param dtype, autocast dtype)
    ("none", "flash", torch.float32, None),
    ("full", "flash", torch.float32, None),
    ("none", "math", torch.float32, None),
    ("none", "flash", torch.float32, torch.bfloat16),
    ("full", "flash", torch.float32, torch.bfloat16),
    ("none", "math", torch.float32, torch.bfloat16),
    ("none", "flash", torch.bfloat16, None),
]


def saved_and_predicted(config, checkpointing, attention, param_dtype, compute_dtype, device, batch, seq_len):
    model = build(config, checkpointing, device, param_dtype)
    tokens = torch.randint(config.vocab_size, (batch, seq_len), device=device)
    with (
        sdpa_kernel(BACKENDS[attention]),
        torch.autocast(device, dtype=compute_dtype or torch.float32, enabled=compute_dtype is not None),
    ):
        saved = measure_saved_activations(model, tokens)
    predicted = predict_step_memory(
        config,
        batch,
        seq_len,
        param_dtype=param_dtype,
        compute_dtype=compute_dtype,
        checkpointing=checkpointing,
        attention=attention,
    )
    return saved, predicted


@pytest.mark.parametrize("checkpointing, attention, param_dtype, compute_dtype", CASES)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_predicted_activations_equal_saved_bytes(name, checkpointing, attention, param_dtype, compute_dtype):
    saved, predicted = saved_and_predicted(
        CONFIGS[name], checkpointing, attention, param_dtype, compute_dtype, "cpu", batch=2, seq_len=12
    )
    assert saved == predicted.activations, f"measured {saved} bytes, predicted {predicted.activations}"


PEAK_CASES = {  # (config, batch, seq_len, checkpointing, autocast dtype, optimizer): where the peak should be
    "backward, at the loss": (
        LlamaConfig(vocab_size=256, d_model=64, n_layers=2, d_ff=176),
        8,
        64,
        "none",
        None,
        "adamw",
    ),
    "optimizer.step()": (
        LlamaConfig(vocab_size=256, d_model=128, n_layers=2, d_ff=352),
        1,
        8,
        "none",
        None,
        "adamw",
    ),
    "backward, in block 0": (
        LlamaConfig(vocab_size=64, d_model=64, n_layers=2, d_ff=512),
        8,
        64,
        "full",
        torch.bfloat16,
        "adamw",
    ),
    "backward, in block 0 (tied embeddings)": (
        LlamaConfig(vocab_size=512, d_model=64, n_layers=2, d_ff=512, tie_embeddings=True),
        8,
        64,
        "full",
        torch.bfloat16,
        "adamw",
    ),
    "forward, in the loss": (
        LlamaConfig(vocab_size=1024, d_model=64, n_layers=8, n_heads=1, n_kv_heads=1, d_ff=256),
        4,
        64,
        "full",
        torch.bfloat16,
        "sgd",
    ),
}


@pytest.mark.parametrize("phase", list(PEAK_CASES))
def test_predicted_peak_equals_the_cpu_profilers(phase: str):
    """The peak of a whole step on CPU, from the profiler's memory timeline, one case per place the peak can
    be. 1%: left out are a few kilobytes of host-side small tensors (AdamW's step counters, the loss, the
    checkpoints' CPU RNG states) against megabytes, and the order in which autograd frees a block's
    gradients (the block-backward estimate was within 0.5% here)."""
    config, batch, seq_len, checkpointing, compute_dtype, optimizer = PEAK_CASES[phase]
    predicted = predict_step_memory(
        config, batch, seq_len, compute_dtype=compute_dtype, checkpointing=checkpointing, optimizer=optimizer
    )
    assert predicted.peak_phase.startswith(phase.split(" (")[0])
    model = build(config, checkpointing)
    measured = measure_step_memory(model, batch, seq_len, compute_dtype=compute_dtype, optimizer=optimizer)
    assert measured.before == pytest.approx(
        predicted.parameters + predicted.buffers + predicted.optimizer_states, rel=0.01
    )
    assert measured.peak == pytest.approx(predicted.peak, rel=0.01), predicted


def test_checkpointing_keeps_only_block_inputs():
    config = CONFIGS["gqa"]
    full, none = (predict_step_memory(config, 2, 12, checkpointing=c) for c in ("full", "none"))
    assert full.activations_per_layer == 2 * 12 * config.d_model * 4
    assert full.activations_per_layer < none.activations_per_layer


def test_peak_moves_from_the_loss_to_the_optimizer_as_the_batch_shrinks():
    config = LlamaConfig.preset("350m")
    big, small = (predict_step_memory(config, b, 1024, compute_dtype=torch.bfloat16) for b in (8, 1))
    assert big.peak_phase.startswith("backward, at the loss")
    assert (
        big.peak == big.parameters + big.buffers + big.optimizer_states + big.activations + big.loss_buffers
    )
    assert small.peak_phase.startswith("optimizer.step()")
    # parameters, gradients, two states, one temporary: all fp32
    assert small.peak == 5 * small.parameters + small.buffers


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"optimizer": "lion"}, "optimizer='lion' is not modelled; choose one of adamw, sgd"),
        ({"checkpointing": "selective"}, "checkpointing='selective': choose 'none' or 'full'"),
        ({"attention": "ring"}, "attention='ring': choose one of flash, efficient, math"),
    ],
)
def test_bad_arguments_say_what_to_pass(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        predict_step_memory(CONFIGS["gqa"], 2, 12, **kwargs)


def test_kernel_path_is_refused():
    kernel_config = LlamaConfig(d_model=128, n_heads=2, n_kv_heads=1, use_kernels=True)
    with pytest.raises(ValueError, match="models the plain path"):
        predict_step_memory(kernel_config, 2, 12)


# ----------------------------------------------------------------------------------------------------
# GPU: CUDA's attention backends, and the peak of a whole step
# ----------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize(
    "attention, compute_dtype",
    [("flash", torch.bfloat16), ("efficient", torch.bfloat16), ("efficient", None), ("math", torch.bfloat16)],
)
def test_predicted_activations_equal_saved_bytes_gpu(attention: str, compute_dtype: torch.dtype | None):
    """As on CPU, but the CUDA kernels may also keep their dropout RNG state (a seed and an offset, 8-byte
    integers; three numbers in torch 2.11's flash) per layer even without dropout: at most 32 bytes a layer
    over the prediction, while a wrong term would be off by far more (s = 200 is no multiple of 32, so the
    efficient backend's padded log-sum-exp differs from flash's by 2 * 4 heads * 24 * 4 bytes a layer)."""
    config = LlamaConfig(
        vocab_size=1000, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=704, max_seq_len=256
    )
    for checkpointing in ("none", "full"):
        saved, predicted = saved_and_predicted(
            config, checkpointing, attention, torch.float32, compute_dtype, "cuda", batch=2, seq_len=200
        )
        rng_state = 32 * config.n_layers if checkpointing == "none" and attention != "math" else 0
        assert 0 <= saved - predicted.activations <= rng_state, (checkpointing, saved, predicted.activations)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "preset, batch, seq_len, checkpointing",
    [("125m", 8, 1024, "none"), ("350m", 4, 1024, "full"), ("1b", 2, 2048, "none"), ("1b", 1, 512, "none")],
)
def test_predicted_peak_within_10_percent_gpu(preset: str, batch: int, seq_len: int, checkpointing: str):
    """bf16 autocast over fp32 parameters (fp32 gradients and AdamW states), flash attention. The cases
    cover both places the peak can be: at the loss's backward (large batch) and in optimizer.step() (small
    batch, or checkpointing). 10%: what the predictor leaves out (cuBLAS workspaces, the allocator's
    512-byte rounding, the exact order autograd frees buffers in) is a few percent at these sizes."""
    config = LlamaConfig.preset(preset)
    # In one process with the rest of the GPU suite, earlier tests' caches (kernel workspaces, compiled
    # models) may still hold memory: the allocator's peak counts them, the prediction is of this model alone.
    gc.collect()
    others = torch.cuda.memory_allocated()
    model = build(config, checkpointing, "cuda")
    measured = measure_step_memory(model, batch, seq_len, compute_dtype=torch.bfloat16)
    predicted = predict_step_memory(
        config, batch, seq_len, compute_dtype=torch.bfloat16, checkpointing=checkpointing, attention="flash"
    )
    table = "\n".join(f"{name:>22}: {value / 2**20:10.1f} MiB" for name, value in predicted.rows())
    assert measured.peak - others == pytest.approx(predicted.peak, rel=0.10), (
        f"measured peak {(measured.peak - others) / 2**20:.1f} MiB (before the step "
        f"{(measured.before - others) / 2**20:.1f}; {others / 2**20:.1f} MiB held by others not counted); "
        f"predicted, {predicted.peak_phase}:\n{table}"
    )
