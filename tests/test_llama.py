"""common.models.llama on CPU at toy sizes, each piece against an independent reference.

References: rotary embeddings against complex multiplication in float64; attention against scores, mask
and softmax written out in float64 with each query head reading its kv head by index (h // group); the loss
against F.cross_entropy of the logits. Tolerances: fp32 computations of a few hundred terms compared with a
float64 computation agree to ~1e-6 relative (fp32 epsilon 1.2e-7 times a few accumulations), so 1e-5.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from common.models import llama
from common.models.llama import (
    KERNEL_HEAD_DIMS,
    PRESETS,
    Attention,
    Llama,
    LlamaConfig,
    apply_rotary,
    count_parameters,
    rope_tables,
    training_flops,
)

TINY = LlamaConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=88, max_seq_len=16)


def tiny(**changes) -> LlamaConfig:
    return LlamaConfig(**{**TINY.__dict__, **changes})


def tokens_for(config: LlamaConfig, batch: int = 2, seq: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


def test_logits_shape_and_loss_is_cross_entropy_of_logits():
    torch.manual_seed(0)
    model = Llama(TINY)
    tokens, targets = tokens_for(TINY), tokens_for(TINY, seed=1)
    logits = model(tokens)
    assert logits.shape == (2, 12, TINY.vocab_size)
    expected = F.cross_entropy(logits.flatten(0, 1).double(), targets.flatten())
    torch.testing.assert_close(model.loss(tokens, targets).double(), expected, rtol=1e-5, atol=1e-6)


def test_changing_a_token_changes_no_earlier_logit():
    torch.manual_seed(0)
    model = Llama(TINY)
    tokens = tokens_for(TINY, batch=1)
    for t in (0, 5, 11):
        changed = tokens.clone()
        changed[0, t] = (changed[0, t] + 1) % TINY.vocab_size
        before, after = model(tokens), model(changed)
        # Positions < t see the same inputs through the same ops: equal up to fp32 reassociation at most.
        torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
        assert (after[:, t] - before[:, t]).abs().max() > 1e-4, "the changed token's own logits must move"


def reference_rotary(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Pairs (x[2i], x[2i+1]) as complex numbers times exp(j p theta^(-2i/D)), in float64."""
    _, s, _, d = x.shape
    pairs = torch.view_as_complex(x.double().reshape(*x.shape[:-1], d // 2, 2))  # (b, s, h, d/2) complex
    freqs = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(s, dtype=torch.float64)[:, None] * freqs  # (s, d/2)
    rotated = pairs * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    return torch.view_as_real(rotated).flatten(-2)  # (b, s, h, d)


@pytest.mark.parametrize("head_dim, theta", [(8, 10000.0), (16, 500000.0)])
def test_rotary_equals_complex_multiplication(head_dim: int, theta: float):
    x = torch.randn(2, 13, 3, head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_tables(head_dim, 32, theta)
    assert cos.shape == sin.shape == (32, head_dim // 2)
    out = apply_rotary(x, cos[:13], sin[:13])
    torch.testing.assert_close(out.double(), reference_rotary(x, theta), rtol=1e-5, atol=1e-5)
    # A rotation keeps each pair's length: a check that needs no reference at all.
    torch.testing.assert_close(out.norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=1e-5)


def reference_attention(attention: Attention, x: torch.Tensor, theta: float) -> torch.Tensor:
    """Multi-head attention written out in float64: query head h reads kv head h // group."""
    b, s, _ = x.shape
    d = attention.head_dim
    x = x.double()
    q, k, v = (
        (x @ lin.weight.double().T).view(b, s, -1, d) for lin in (attention.wq, attention.wk, attention.wv)
    )
    q, k = reference_rotary(q, theta), reference_rotary(k, theta)
    n_q, group = q.shape[2], q.shape[2] // k.shape[2]
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    heads = []
    for h in range(n_q):
        scores = q[:, :, h] @ k[:, :, h // group].transpose(1, 2) / math.sqrt(d)  # (b, s, s)
        weights = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        heads.append(weights @ v[:, :, h // group])  # (b, s, d)
    return torch.cat(heads, dim=-1) @ attention.wo.weight.double().T


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])  # 4: plain multi-head; 2, 1: grouped, multi-query
def test_attention_equals_multi_head_reference(n_kv_heads: int):
    config = tiny(n_kv_heads=n_kv_heads)
    torch.manual_seed(0)
    attention = Llama(config).layers[0].attention
    assert attention.wk.out_features == n_kv_heads * config.head_dim
    x = torch.randn(2, 11, config.d_model)
    cos, sin = rope_tables(config.head_dim, 11, config.rope_theta)
    out = attention(x, cos, sin)
    torch.testing.assert_close(
        out.double(), reference_attention(attention, x, config.rope_theta), rtol=1e-5, atol=1e-6
    )


def test_attention_reads_its_heads_from_the_weights_and_attend_can_be_replaced():
    """The two hooks other modules use: a head-sharded copy (tensor parallelism) needs no code change, and
    attend() replaced on an instance (sequence parallelism) receives q with the query heads, k/v with the
    kv heads. Sharding by heads splits wo by input columns, so the shards' outputs sum to the whole's."""
    config = tiny(n_heads=4, n_kv_heads=2)
    torch.manual_seed(0)
    whole = Llama(config).layers[0].attention
    x = torch.randn(2, 9, config.d_model)
    cos, sin = rope_tables(config.head_dim, 9, config.rope_theta)
    hd, shards, total = config.head_dim, 2, torch.zeros(2, 9, config.d_model)
    for i in range(shards):
        shard = copy.deepcopy(whole)
        q_rows = slice(i * 2 * hd, (i + 1) * 2 * hd)  # query heads 2i, 2i + 1
        kv_rows = slice(i * hd, (i + 1) * hd)  # the kv head they share
        shard.wq.weight = nn.Parameter(whole.wq.weight[q_rows])
        shard.wk.weight = nn.Parameter(whole.wk.weight[kv_rows])
        shard.wv.weight = nn.Parameter(whole.wv.weight[kv_rows])
        shard.wo.weight = nn.Parameter(whole.wo.weight[:, q_rows])
        seen = []

        def attend(q, k, v, plain=shard.attend, seen=seen):
            seen.append((q.shape, k.shape))
            return plain(q, k, v)

        shard.attend = attend
        total += shard(x, cos, sin)
        assert seen == [((2, 2, 9, hd), (2, 1, 9, hd))]
    torch.testing.assert_close(total, whole(x, cos, sin), rtol=1e-5, atol=1e-6)


def test_tied_embeddings_share_one_tensor():
    torch.manual_seed(0)
    tied, untied = Llama(tiny(tie_embeddings=True)), Llama(TINY)
    assert tied.output.weight is tied.tok_embeddings.weight
    assert untied.output.weight is not untied.tok_embeddings.weight
    n_embedding = TINY.vocab_size * TINY.d_model
    assert (
        sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == n_embedding
    )
    # The one tensor's gradient sums both uses: the output projection's and the embedding lookup's.
    tokens = tokens_for(TINY)
    tied.loss(tokens, tokens).backward()
    assert tied.tok_embeddings.weight.grad[tokens.unique()].abs().sum() > 0


def test_overfits_one_tiny_batch():
    torch.manual_seed(0)
    model = Llama(TINY)
    tokens, targets = tokens_for(TINY, seq=8), tokens_for(TINY, seq=8, seed=1)  # random: only memorisable
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    first = model.loss(tokens, targets).item()
    assert abs(first - math.log(TINY.vocab_size)) < 0.1, (
        "small init: the first loss is that of uniform guesses"
    )
    for _ in range(60):
        loss = model.loss(tokens, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05, (
        f"16 random targets should be memorised, loss went {first:.3f} -> {loss.item():.3f}"
    )


def test_seeded_construction_is_reproducible_and_init_is_scaled():
    torch.manual_seed(3)
    a = Llama(TINY)
    torch.manual_seed(3)
    b = Llama(TINY)
    torch.manual_seed(4)
    c = Llama(TINY)
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters(), strict=True):
        assert torch.equal(pa, pb), name
        if pa.dim() == 2:
            assert not torch.equal(pa, pc), name
    big = Llama(tiny(d_model=64, d_ff=256, vocab_size=512, n_layers=8))
    tol = 0.1  # a std estimated from >= 16k samples is within a few percent of the true one
    assert big.tok_embeddings.weight.std().item() == pytest.approx(0.02, rel=tol)
    assert big.layers[0].attention.wq.weight.std().item() == pytest.approx(0.02, rel=tol)
    assert big.layers[0].feed_forward.w2.weight.std().item() == pytest.approx(0.02 / 4, rel=tol)
    assert big.layers[0].attention.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=tol)
    assert "rope_cos" not in big.state_dict()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"n_heads": 3}, "d_model=32 is not divisible by n_heads=3"),
        ({"n_heads": 4, "n_kv_heads": 3}, "n_heads=4 is not divisible by n_kv_heads=3"),
        ({"d_model": 36, "n_heads": 4}, "head_dim = d_model // n_heads = 9 is odd"),
        ({"n_layers": 0}, "n_layers must be a positive int"),
    ],
)
def test_bad_config_says_what_and_how_to_fix(changes: dict, message: str):
    with pytest.raises(ValueError, match=message):
        tiny(**changes)


def test_too_long_sequence_is_refused():
    model = Llama(TINY)
    with pytest.raises(ValueError, match="sequence length 17 exceeds max_seq_len=16"):
        model(torch.zeros(1, 17, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------
# Named sizes, parameter and FLOP counts
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        tiny(tie_embeddings=True),
        tiny(n_kv_heads=4, d_ff=40, n_layers=3),
        tiny(n_kv_heads=1),
        LlamaConfig(),
    ],
    ids=["untied", "tied", "mha", "mqa", "toy"],
)
def test_count_parameters_equals_the_built_model(config: LlamaConfig):
    assert count_parameters(config) == sum(p.numel() for p in Llama(config).parameters())


def test_presets_count_what_the_docstring_says():
    """The big presets are counted, not built (count_parameters is checked against built models above)."""
    assert set(PRESETS) >= {"toy", "125m", "350m", "1b"}
    for name in PRESETS:
        assert f"{count_parameters(LlamaConfig.preset(name)):,}" in llama.__doc__, (
            f"stale docstring row: {name}"
        )
    one_b = LlamaConfig.preset("1b")  # Llama-3.2-1B's shape
    shape = (one_b.d_model, one_b.n_layers, one_b.n_heads, one_b.n_kv_heads, one_b.d_ff, one_b.tie_embeddings)
    assert shape == (2048, 16, 32, 8, 8192, True)
    published = 1_235_814_400  # Llama-3.2-1B, with its 128256-token vocabulary
    assert count_parameters(LlamaConfig.preset("1b", vocab_size=128256)) == published
    assert LlamaConfig.preset("125m", n_layers=2).n_layers == 2
    with pytest.raises(ValueError, match="unknown preset '7b'; choose one of toy, 125m"):
        LlamaConfig.preset("7b")


def test_training_flops_equals_counted_matmul_flops():
    """FlopCounterMode counts every matmul of one forward and backward, including attention's.

    Under SDPA's math backend attention is two batched matmuls over the whole s x s square (the causal mask
    is applied to the scores, not skipped), so the count must equal the non-causal formula exactly; the
    causal one is smaller by half of the attention term. Not counted by either: the embedding lookup (an
    index, no multiply), norms, rotary, softmax, the loss.
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    for config in (TINY, tiny(tie_embeddings=True, n_kv_heads=1, n_layers=3)):
        model = Llama(config)
        tokens = tokens_for(config, batch=3, seq=10)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model.loss(tokens, tokens).backward()
        n_tokens = tokens.numel()
        assert counter.get_total_flops() == training_flops(config, n_tokens, 10, causal=False)
        attention_forward = 4 * config.n_layers * 10 * config.n_heads * config.head_dim * n_tokens
        causal_saving = 3 * attention_forward / 2
        assert (
            training_flops(config, n_tokens, 10)
            == training_flops(config, n_tokens, 10, causal=False) - causal_saving
        )


# ----------------------------------------------------------------------------------------------------
# use_kernels=True: the Triton path against the plain one
# ----------------------------------------------------------------------------------------------------

KERNEL_TINY = LlamaConfig(
    vocab_size=64, d_model=128, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_seq_len=16
)


def plain_and_kernel_step(
    config: LlamaConfig, tokens: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype
):
    """Logits, loss and gradients of the plain and the kernel model, built from one seed, in dtype."""
    results = []
    for use_kernels in (False, True):
        torch.manual_seed(0)
        model = Llama(LlamaConfig(**{**config.__dict__, "use_kernels": use_kernels})).to(tokens.device, dtype)
        with torch.no_grad():
            logits = model(tokens)
        loss = model.loss(tokens, targets)
        loss.backward()
        results.append((logits, loss, {name: p.grad for name, p in model.named_parameters()}))
    return results


def test_kernel_head_dims_agree_with_the_kernel():
    from common.kernels.flash_attention import HEAD_DIMS

    assert KERNEL_HEAD_DIMS == HEAD_DIMS
    with pytest.raises(ValueError, match="use_kernels=True needs head_dim in"):
        tiny(use_kernels=True)  # head_dim 8


def test_kernel_path_equals_plain_path_cpu():
    """fp32 under Triton's interpreter: both paths compute the same sums in a different order (tiles and
    online softmax against BLAS), so they differ by a few fp32 ulps of each tensor's scale (~1e-7 relative
    measured); 1e-5 of each tensor's largest magnitude leaves room without hiding a wrong formula, which
    would be off by O(1) of it."""
    tokens, targets = tokens_for(KERNEL_TINY, seq=16), tokens_for(KERNEL_TINY, seq=16, seed=1)
    (logits, loss, grads), (k_logits, k_loss, k_grads) = plain_and_kernel_step(
        KERNEL_TINY, tokens, targets, torch.float32
    )
    torch.testing.assert_close(k_logits, logits, rtol=1e-5, atol=1e-5 * logits.abs().max().item())
    torch.testing.assert_close(k_loss, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(
            k_grads[name], grad, rtol=1e-5, atol=1e-5 * grad.abs().max().item(), msg=name
        )


@pytest.mark.gpu
def test_kernel_path_equals_plain_path_bf16_gpu():
    """bf16 at a realistic small size: each bf16 path is judged by its distance from an fp32 run of the
    plain model. bf16 keeps 8 bits of mantissa, so the plain path itself is off by ~1e-2 of a tensor's
    scale; the kernel path must be no further than twice that (it accumulates in fp32 as cuBLAS does)."""
    config = LlamaConfig(
        vocab_size=32000, d_model=512, n_layers=4, n_heads=8, n_kv_heads=2, d_ff=1408, max_seq_len=512
    )
    generator = torch.Generator().manual_seed(0)
    tokens, targets = (
        torch.randint(config.vocab_size, (4, 512), generator=generator).cuda() for _ in range(2)
    )
    (ref_logits, ref_loss, ref_grads), _ = plain_and_kernel_step(config, tokens, targets, torch.float32)
    (logits, loss, grads), (k_logits, k_loss, k_grads) = plain_and_kernel_step(
        config, tokens, targets, torch.bfloat16
    )

    def distance(x: torch.Tensor, ref: torch.Tensor) -> float:
        return ((x.float() - ref).abs().max() / ref.abs().max()).item()

    pairs = [("logits", k_logits, logits, ref_logits), ("loss", k_loss, loss, ref_loss)]
    pairs += [(name, k_grads[name], grads[name], ref_grads[name]) for name in ref_grads]
    for name, kernel, plain, ref in pairs:
        assert distance(kernel, ref) <= 2 * distance(plain, ref) + 1e-3, name
