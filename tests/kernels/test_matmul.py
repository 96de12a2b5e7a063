"""common.kernels.matmul against a float64 matmul: each kernel (portable, TMA, split-K and its small-M
tiles), each activation, the backward, the precision policy, which kernel a shape gets, and bad input.

On a CPU the kernels run in Triton's interpreter on small, awkward shapes in fp32 and fp16 (one small
autotune config each); the `gpu` tests run compiled, autotuned kernels at real sizes, bf16 included.

Tolerances. The kernels accumulate in fp32 and round once to the output dtype. Against a float64
reference on the same rounded inputs the error is
    |y - y64| <= u |y64|  (the final rounding; u = 2^-11 fp16, 2^-8 bf16)
               + |act'| x (fp32 accumulation error, ~sqrt(K) 2^-24 x typical |a||b|: negligible here).
So rtol = 2u, and atol = 2u x sqrt(K) (the typical size of an entry of a @ b for unit-variance inputs)
for entries that happen to be near 0. fp32 inputs: under the interpreter tl.dot is an fp32 numpy matmul,
and on a GPU input_precision="ieee" is exact fp32 FMA: rtol = 1e-5, atol = 1e-5 sqrt(K), far above fp32
rounding (a few 2^-24 per operation) and far below what a wrong index or a dropped K-slab moves. TF32
(10-bit mantissa inputs) gets its own, looser bound in its test.
"""

from __future__ import annotations

import math

import pytest
import torch

from common.kernels import INTERPRETED
from common.kernels import matmul as matmul_module
from common.kernels.matmul import ACTIVATIONS, fp32_input_precision, matmul, matmul_forward, matmul_reference

# Triton's interpreter converts 1-element numpy arrays to int (deprecated in numpy >= 1.25), and its exp
# overflows to inf for very negative sigmoid arguments, which is the IEEE behaviour the kernel relies on
# (sigmoid -> 0).
pytestmark = [
    pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning"),
]

UNIT = {torch.float32: 5e-6, torch.float16: 2**-11, torch.bfloat16: 2**-8}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(m, k, generator=gen).to(DEVICE, dtype),
        torch.randn(k, n, generator=gen).to(DEVICE, dtype),
    )


def reference64(a: torch.Tensor, b: torch.Tensor, activation: str | None = None) -> torch.Tensor:
    return matmul_reference(a.double(), b.double(), activation)


def assert_close(actual: torch.Tensor, expected64: torch.Tensor, dtype: torch.dtype, k: int) -> None:
    u = UNIT[dtype]
    torch.testing.assert_close(
        actual.double(), expected64, rtol=2 * u, atol=2 * u * math.sqrt(k), check_dtype=False
    )


# ---------------------------------------------------------------------------------------------------
# CPU (interpreter on a machine without a GPU): small awkward shapes, fp32 and fp16
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def portable_for_small_m(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send small M to the portable kernel too (it is the split-K kernel's, up to SMALL_M_MAX rows), so
    that the portable kernel is tested on the same awkward shapes; plans made meanwhile are dropped."""
    monkeypatch.setattr(matmul_module, "SMALL_M_MAX", 0)
    monkeypatch.setattr(matmul_module, "_PLANS", {})


# With the interpreter's 32 x 32 x 16 tiles: (37, 129, 53) has ragged tiles in M, N and K and 10 tiles
# in 5 groups of 2 rows (the grouped order's short last group too); (1, 40, 300): one row, a long K
# (19 K-steps); (64, 64, 64): everything divides.
SHAPES = [(37, 129, 53), (1, 40, 300), (64, 64, 64)]


@pytest.mark.usefixtures("portable_for_small_m")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mnk", SHAPES)
def test_portable_kernel_matches_float64(mnk: tuple[int, int, int], dtype: torch.dtype) -> None:
    a, b = inputs(*mnk, dtype)
    y, z = matmul_forward(a, b, split_k=1, use_tma=False)
    assert z is None and y.shape == (mnk[0], mnk[1]) and y.dtype == dtype
    assert_close(y, reference64(a, b), dtype, mnk[2])


@pytest.mark.usefixtures("portable_for_small_m")
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_fused_activations_and_preactivation(activation: str) -> None:
    a, b = inputs(37, 129, 53, torch.float16)
    y, z = matmul_forward(a, b, activation, split_k=1, use_tma=False, store_preactivation=True)
    assert_close(y, reference64(a, b, activation), torch.float16, 53)
    assert_close(z, reference64(a, b), torch.float16, 53)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_split_k_matches_float64(dtype: torch.dtype) -> None:
    # 19 K-steps of 16 over 3 slices: 7, 7 and 5 steps, the last one ragged.
    a, b = inputs(5, 40, 300, dtype)
    y, z = matmul_forward(a, b, "silu", split_k=3, store_preactivation=True)
    assert_close(y, reference64(a, b, "silu"), dtype, 300)
    assert_close(z, reference64(a, b), dtype, 300)


def test_split_k_with_more_slices_than_k_steps() -> None:
    # 4 K-steps over 6 slices: two slices get no steps and must contribute zeros.
    a, b = inputs(3, 20, 64, torch.float32)
    y, _ = matmul_forward(a, b, split_k=6)
    assert_close(y, reference64(a, b), torch.float32, 64)


# The small-M path: the split-K kernel with one slice (written straight to y) or three (summed by the
# last slice), on the interpreter's 16-row tiles. M = 1 and 3 pad one tile; 16 fills it exactly; 17 leaves
# a second tile of one row; 64 makes four. N = 45 and K = 83 are odd: ragged last tiles in N (32 wide)
# and K (6 steps of 16, the last 3 deep), and 3 slices of 2 steps.
@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64])
def test_small_m_kernel_matches_float64(m: int, split_k: int, activation: str | None) -> None:
    a, b = inputs(m, 45, 83, torch.float16, seed=m)
    assert matmul_module._make_plan(a, b, activation, split_k, None, None).path == "split_k"
    y, z = matmul_forward(a, b, activation, split_k=split_k, store_preactivation=activation is not None)
    assert y.shape == (m, 45) and y.dtype == torch.float16
    assert_close(y, reference64(a, b, activation), torch.float16, 83)
    if activation is not None:
        assert_close(z, reference64(a, b), torch.float16, 83)


def test_small_m_tile_heights() -> None:
    # One row of tiles, as short as M allows, up to 64 rows; 64- and 128-row tiles above.
    rows = {m: matmul_module.skinny_tile_rows(m) for m in (1, 3, 16, 17, 32, 33, 64, 65, 256)}
    assert rows == {
        1: (16,), 3: (16,), 16: (16,), 17: (32,), 32: (32,), 33: (64,), 64: (64,), 65: (64, 128), 256: (64, 128)
    }  # fmt: skip
    configs = matmul_module.SPLIT_K_CONFIGS
    for m, allowed in rows.items():
        kept = matmul_module._prune_split_k_configs(configs, {"M": m})
        assert kept and {c.kwargs["BLOCK_M"] for c in kept} == set(allowed), m


@pytest.mark.parametrize(
    ("m", "n", "k", "options", "path", "splits"),
    [
        # Decode, K = N = 4096: 32 tiles of 64 x 128 on 132 SMs, 8 slices (K / 512 caps the 9 wanted).
        (16, 4096, 4096, {}, "split_k", 8),
        (1, 4096, 14336, {}, "split_k", 9),  # the MLP's down projection: ceil(2 x 132 / 32 tiles)
        (64, 14336, 4096, {}, "split_k", 3),  # its up projection: 112 tiles
        (16, 4096, 4096, {"split_k": 1}, "split_k", 1),  # unsplit, still the small-M tiles
        (64, 32768, 1024, {}, "split_k", 1),  # 256 tiles fill the GPU: no split, small-M tiles
        (16, 4096, 4096, {"use_tma": True}, "tma", 1),  # forced
        (256, 4096, 4096, {}, "split_k", 3),  # 128 tiles of 64 x 128: still short of 132 SMs
        (65, 14336, 4096, {}, "big", 1),  # 224 tiles: the big-M kernels
        (256, 4096, 4096, {"split_k": 1}, "big", 1),
        (4096, 4096, 4096, {}, "big", 1),
    ],
)
def test_path_selection_by_shape(
    m: int, n: int, k: int, options: dict, path: str, splits: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    if options.get("use_tma") and not INTERPRETED and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper (sm_90) or newer GPU")
    monkeypatch.setattr(matmul_module, "sm_count", lambda device: 132)  # an H100's or H200's SMs
    a = torch.empty(m, k, device=DEVICE, dtype=torch.float16)  # never read: shapes and strides decide
    b = torch.empty(k, n, device=DEVICE, dtype=torch.float16)
    options = {"split_k": None, "use_tma": None, **options}
    plan = matmul_module._make_plan(a, b, None, options["split_k"], options["use_tma"], None)
    # "big": TMA where it applies (Hopper), else the portable kernel (always, under the interpreter).
    assert plan.path in ("tma", "portable") if path == "big" else plan.path == path
    assert plan.splits == splits


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_tma_kernel_matches_float64(activation: str | None) -> None:
    # (40, 72, 48): K and N multiples of 8 (16-byte fp16 rows), M, N ragged against 32-wide tiles; 6 tiles
    # for the 2 persistent programs of the interpreter.
    a, b = inputs(40, 72, 48, torch.float16)
    y, z = matmul_forward(a, b, activation, split_k=1, use_tma=True, store_preactivation=True)
    assert_close(y, reference64(a, b, activation), torch.float16, 48)
    assert_close(z, reference64(a, b), torch.float16, 48)


def test_tma_kernel_with_host_descriptors(monkeypatch: pytest.MonkeyPatch) -> None:
    # Large products make their TMA descriptors on the host; force that path on the small shape.
    monkeypatch.setattr(matmul_module, "DEVICE_DESCRIPTOR_MAX_WORK", 0)
    monkeypatch.setattr(matmul_module, "_PLANS", {})
    a, b = inputs(40, 72, 48, torch.float16, seed=1)
    y, z = matmul_forward(a, b, "silu", split_k=1, use_tma=True, store_preactivation=True)
    assert_close(y, reference64(a, b, "silu"), torch.float16, 48)
    assert_close(z, reference64(a, b), torch.float16, 48)


@pytest.mark.parametrize("small_m_max", [0, 64], ids=["portable", "split_k"])
def test_batched_and_transposed_inputs(small_m_max: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Leading dims of a are rows; transposed views are read through their strides, without copies, by
    # either pointer kernel (the 10 and 7 rows here are small M: the split-K kernel's unless sent away).
    monkeypatch.setattr(matmul_module, "SMALL_M_MAX", small_m_max)
    monkeypatch.setattr(matmul_module, "_PLANS", {})
    gen = torch.Generator().manual_seed(4)
    a = torch.randn(2, 5, 24, generator=gen).to(DEVICE)
    bt = torch.randn(33, 24, generator=gen).to(DEVICE)
    y, _ = matmul_forward(a, bt.t(), split_k=1)
    assert y.shape == (2, 5, 33)
    assert_close(y, reference64(a, bt.t()), torch.float32, 24)
    at = torch.randn(24, 7, generator=gen).to(DEVICE)
    y, _ = matmul_forward(at.t(), bt.t(), split_k=1)
    assert_close(y, reference64(at.t(), bt.t()), torch.float32, 24)


@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_backward_matches_float64(activation: str | None) -> None:
    gen = torch.Generator().manual_seed(5)
    a = torch.randn(2, 5, 24, generator=gen).to(DEVICE).requires_grad_()
    b = torch.randn(24, 33, generator=gen).to(DEVICE).requires_grad_()
    dy = torch.randn(2, 5, 33, generator=gen).to(DEVICE)
    da, db = torch.autograd.grad(matmul(a, b, activation), (a, b), dy)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    da64, db64 = torch.autograd.grad(matmul_reference(a64, b64, activation), (a64, b64), dy.double())
    assert_close(da, da64, torch.float32, 33)  # da sums over N = 33
    assert_close(db, db64, torch.float32, 10)  # db sums over the 10 rows of a


def test_zero_size_dimensions() -> None:
    a, b = inputs(4, 6, 0, torch.float32)
    y, _ = matmul_forward(a, b, "relu")
    assert torch.equal(y, torch.zeros(4, 6, device=DEVICE))
    assert matmul_forward(*inputs(0, 6, 5, torch.float32))[0].shape == (0, 6)


def test_auto_split_k_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # With an H100's 132 SMs: a decode GEMM (32 tiles) is split, a square one (2048 tiles) is not.
    monkeypatch.setattr(matmul_module, "sm_count", lambda device: 132)
    cuda = torch.device("cuda")
    assert matmul_module._auto_split_k(16, 4096, 14336, cuda) == 9  # ceil(2 x 132 / 32 tiles)
    assert matmul_module._auto_split_k(1, 1024, 8192, cuda) == 16  # 8 tiles, 16 slices of 512
    assert matmul_module._auto_split_k(16, 4096, 1024, cuda) == 2  # K too short for more slices
    assert matmul_module._auto_split_k(4096, 4096, 4096, cuda) == 1


def test_the_rules_split_is_kept_only_if_it_times_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the auto rule's split is timed once, at a geometry's first call, against split_k=1's plan,
    and the faster is kept; never while a CUDA graph is captured (it runs untimed and is timed later), never
    for an explicit split_k, never on the CPU. Checked here with the timing replaced by a stub that says
    which side is faster (the interpreter runs both plans' kernels; nothing is timed for real)."""
    a, b = inputs(16, 64, 2048, torch.float32)
    rule = matmul_module._make_plan(a, b, None, 4, None, None)
    assert rule.path == "split_k" and rule.splits == 4
    assert not matmul_module._split_to_time(rule, 4, a)  # asked for: not second-guessed
    assert not matmul_module._split_to_time(rule, None, a.cpu())  # on the CPU: nothing to time

    timings: list[float] = []

    def timing_says(split_speedup: float):  # stands in for _split_speedup: counts the timings it is asked for
        return lambda one_slice, split, device: timings.append(split_speedup) or split_speedup

    monkeypatch.setattr(matmul_module, "_split_to_time", lambda plan, split_k, a: split_k is None)
    monkeypatch.setattr(matmul_module, "_auto_split_k", lambda m, n, k, device: 4)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    for split_speedup, kept in ((2.0, 4), (0.5, 1)):
        # A fresh cache each time; monkeypatch restores the module's own after the test.
        monkeypatch.setattr(matmul_module, "_PLANS", {})
        monkeypatch.setattr(matmul_module, "_split_speedup", timing_says(split_speedup))
        for _ in range(2):  # timed at the first call only
            y, _ = matmul_forward(a, b)
            assert_close(y, reference64(a, b), torch.float32, 2048)
        assert (
            timings == [split_speedup]
            and matmul_module._PLANS[matmul_module._forward_key(a, b)].splits == kept
        )
        timings.clear()

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(matmul_module, "_PLANS", {})
    y, _ = matmul_forward(a, b)  # the rule's split, untimed, and not kept
    assert_close(y, reference64(a, b), torch.float32, 2048)
    assert not timings and not matmul_module._PLANS


def test_fp32_precision_follows_torch_setting() -> None:
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert fp32_input_precision() == "ieee"
        torch.set_float32_matmul_precision("high")
        assert fp32_input_precision() == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_reference_matches_torch() -> None:
    a, b = torch.randn(6, 7, dtype=torch.float64), torch.randn(7, 5, dtype=torch.float64)
    torch.testing.assert_close(
        matmul_reference(a, b, "gelu_tanh"), torch.nn.functional.gelu(a @ b, approximate="tanh")
    )


def test_bad_input_raises_clear_errors() -> None:
    a, b = inputs(4, 6, 5, torch.float32)
    with pytest.raises(ValueError, match=r"inner dimensions differ.*K = 5.*K = 6"):
        matmul(a, torch.randn(6, 3, device=DEVICE))
    with pytest.raises(TypeError, match="cast one"):
        matmul(a, b.half())
    with pytest.raises(TypeError, match="dtype torch.int64"):
        matmul(a.long(), b.long())
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        matmul(a, b, "gelu")
    with pytest.raises(ValueError, match="split_k must be a positive int"):
        matmul(a, b, split_k=0)
    with pytest.raises(ValueError, match="split_k must be a positive int.*got True"):
        matmul_forward(a, b, split_k=True)  # a bool is an int to Python, not a number of slices
    with pytest.raises(ValueError, match="split_k must be a positive int.*got 2.0"):
        matmul_forward(a[:1], b, split_k=2.0)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"b of shape \(K, N\)"):
        matmul(a, b.unsqueeze(0))
    with pytest.raises(ValueError, match="the TMA path takes fp16/bf16"):
        matmul_forward(a, b, split_k=1, use_tma=True)
    with pytest.raises(ValueError, match="16-byte aligned rows"):
        matmul_forward(*inputs(4, 6, 8, torch.float16), split_k=1, use_tma=True)  # N = 6: 12-byte rows
    with pytest.raises(ValueError, match="don't combine"):
        matmul_forward(*inputs(4, 8, 8, torch.float16), split_k=2, use_tma=True)
    with pytest.raises(ValueError, match="input_precision"):
        matmul_forward(a, b, input_precision="fp32")


@pytest.mark.skipif(not INTERPRETED, reason="the bf16 refusal applies to Triton's CPU interpreter only")
def test_interpreter_refuses_bfloat16() -> None:
    with pytest.raises(TypeError, match="bfloat16"):
        matmul(*inputs(4, 6, 5, torch.bfloat16))


# ---------------------------------------------------------------------------------------------------
# GPU: compiled, autotuned kernels, real shapes, bf16
# ---------------------------------------------------------------------------------------------------

# 1024^3 (TMA where the GPU has it), awkward sizes the TMA kernel can't take (odd N, K: portable
# kernel), a TMA-compatible ragged one, and a tall-skinny one.
GPU_SHAPES = [(1024, 1024, 1024), (1000, 1037, 1031), (1000, 1000, 1000), (4096, 64, 4096), (1, 4096, 4096)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mnk", GPU_SHAPES)
def test_gpu_autotuned_matmul(mnk: tuple[int, int, int], dtype: torch.dtype) -> None:
    a, b = inputs(*mnk, dtype)
    assert_close(matmul(a, b), reference64(a, b), dtype, mnk[2])


@pytest.mark.gpu
@pytest.mark.parametrize("use_tma", [False, True])
def test_gpu_portable_and_tma_kernels(use_tma: bool) -> None:
    if use_tma and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper (sm_90) or newer GPU")
    a, b = inputs(2048, 1536, 1024, torch.bfloat16)
    y, _ = matmul_forward(a, b, split_k=1, use_tma=use_tma)
    assert_close(y, reference64(a, b), torch.bfloat16, 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("use_tma", [False, True])
def test_gpu_each_activation(activation: str, use_tma: bool) -> None:
    if use_tma and torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper (sm_90) or newer GPU")
    a, b = inputs(1024, 768, 512, torch.bfloat16)
    y, z = matmul_forward(a, b, activation, split_k=1, use_tma=use_tma, store_preactivation=True)
    assert_close(y, reference64(a, b, activation), torch.bfloat16, 512)
    assert_close(z, reference64(a, b), torch.bfloat16, 512)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
@pytest.mark.parametrize("split_k", [None, 4, 16])
def test_gpu_split_k_decode_shapes(m: int, split_k: int | None) -> None:
    a, b = inputs(m, 4096, 14336, torch.bfloat16)
    y, _ = matmul_forward(a, b, "silu", split_k=split_k)
    assert_close(y, reference64(a, b, "silu"), torch.bfloat16, 14336)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 16, 17, 64, 100, 256])
@pytest.mark.parametrize("split_k", [None, "rule", 1])
def test_gpu_small_m_and_decode_regime(m: int, split_k: int | str | None) -> None:
    # Compiled and autotuned: the small-M tiles (M <= 64, one slice or the rule's split) and the regime
    # above, where the rule splits K (M = 100, 256 at N = 4096: fewer tiles than SMs) or not (split_k=1).
    # None runs what the timing kept; "rule" asks for the rule's split itself, which the timing may drop.
    a, b = inputs(m, 4096, 4096, torch.bfloat16, seed=m)
    if split_k == "rule":
        split_k = matmul_module._auto_split_k(m, 4096, 4096, a.device)
    y, z = matmul_forward(a, b, "silu", split_k=split_k, store_preactivation=True)
    assert_close(y, reference64(a, b, "silu"), torch.bfloat16, 4096)
    assert_close(z, reference64(a, b), torch.bfloat16, 4096)


@pytest.mark.gpu
def test_gpu_decode_benchmark_cases() -> None:
    """The matmul_decode sweep: every weight and M, each against cuBLAS and split_k=1, and M <= 16 against
    the tiled (TMA) kernel too on Hopper, goals on M <= 16 only; and its closures compute the product (one case each run,
    not timed)."""
    cases = matmul_module.decode_benchmark_cases()
    weights, rows = matmul_module.DECODE_WEIGHTS, matmul_module.DECODE_ROWS
    hopper = torch.cuda.get_device_capability() >= (9, 0)  # the tiled baseline is the TMA kernel
    goal_rows = [m for m in rows if m <= matmul_module.DECODE_GOAL_MAX_M] if hopper else []
    assert len(cases) == len(weights) * (2 * len(rows) + len(goal_rows))
    assert len({c.label for c in cases}) == len(cases) and {c.kernel for c in cases} == {"matmul_decode"}
    for case in cases:
        goals = {g.text for g in case.goals}
        if case.x > matmul_module.DECODE_GOAL_MAX_M or case.label.endswith("vs unsplit"):
            assert not goals, case.label
        elif case.baseline_name.startswith("cuBLAS"):
            assert goals == {">= 0.9x cuBLAS"}, case.label
        else:
            assert case.label.endswith("vs tiled") and goals == {">= 1.2x the tiled kernel"}, case.label
    down = [c for c in cases if c.label.startswith("mlp_down 14336x4096 M=16 ")]
    assert len(down) == (3 if hopper else 2)
    u, k = UNIT[torch.bfloat16], 14336
    for case in down:
        # Both sides multiply the case's inputs: each is within one bf16 rounding (and fp32 accumulation
        # error) of the exact product, so within two of each other; 4u leaves room for the accumulation.
        ours, baseline = case.ours(), case.baseline()
        assert ours.shape == baseline.shape == (16, 4096)
        torch.testing.assert_close(ours.double(), baseline.double(), rtol=4 * u, atol=4 * u * math.sqrt(k))


@pytest.mark.gpu
def test_gpu_split_k_is_deterministic_and_leaves_its_tickets_at_zero() -> None:
    """The last slice of each tile sums all slices in slice order: bit-identical results, whichever
    finishes last; and it resets the tile's counter, so the reused counters are zero between calls."""
    a, b = inputs(16, 4096, 14336, torch.bfloat16, seed=3)
    first, _ = matmul_forward(a, b, split_k=8)
    for _ in range(20):
        again, _ = matmul_forward(a, b, split_k=8)
        assert torch.equal(again, first)
    torch.cuda.synchronize()
    tickets = matmul_module._TICKETS._buffers.values()
    assert tickets and all(int(t.abs().sum()) == 0 for t in tickets)


@pytest.mark.gpu
@pytest.mark.parametrize("device_descriptors", [False, True])
def test_gpu_tma_descriptors_made_on_host_or_device(
    device_descriptors: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("TMA needs a Hopper (sm_90) or newer GPU")
    monkeypatch.setattr(matmul_module, "DEVICE_DESCRIPTOR_MAX_WORK", 2**62 if device_descriptors else 0)
    monkeypatch.setattr(matmul_module, "_PLANS", {})
    a, b = inputs(1000, 1032, 1024, torch.bfloat16, seed=2)
    y, z = matmul_forward(a, b, "gelu_tanh", use_tma=True, store_preactivation=True)
    assert_close(y, reference64(a, b, "gelu_tanh"), torch.bfloat16, 1024)
    assert_close(z, reference64(a, b), torch.bfloat16, 1024)


@pytest.mark.gpu
def test_gpu_fp32_ieee_and_tf32() -> None:
    a, b = inputs(512, 384, 1024, torch.float32)
    y64 = reference64(a, b)
    assert_close(matmul_forward(a, b, split_k=1, input_precision="ieee")[0], y64, torch.float32, 1024)
    # TF32 keeps 10 mantissa bits of each input (relative error up to 2^-10 each, sign random across the
    # K products), so the error relative to the result's norm is ~1e-3; bound it at 2^-8 (0.4%), which a
    # wrong tile or a dropped K-slab would exceed by orders of magnitude.
    y_tf32, _ = matmul_forward(a, b, split_k=1, input_precision="tf32")
    assert torch.linalg.norm(y_tf32.double() - y64) <= 2**-8 * torch.linalg.norm(y64)


@pytest.mark.gpu
@pytest.mark.parametrize("activation", [None, "relu", "silu"])
def test_gpu_backward_bf16(activation: str | None) -> None:
    a, b = (t.requires_grad_() for t in inputs(512, 256, 384, torch.bfloat16))
    dy = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    da, db = torch.autograd.grad(matmul(a, b, activation), (a, b), dy)
    a64, b64 = a.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    # The backward takes act' at z rounded to bf16 (what the forward stored) and rounds dz to bf16 before
    # the two GEMMs; the reference does the same roundings, then multiplies in float64.
    z = (a64 @ b64).to(torch.bfloat16).double()
    dz = dy.double() if activation is None else torch.func.vjp(ACTIVATIONS[activation], z)[1](dy.double())[0]
    dz = dz.to(torch.bfloat16).double()
    assert_close(da, dz @ b64.t(), torch.bfloat16, 256)
    assert_close(db, a64.t() @ dz, torch.bfloat16, 512)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("mnk", "kwargs"),
    [
        ((512, 384, 256), {"use_tma": True}),
        ((512, 384, 256), {"use_tma": False, "activation": "silu"}),
        ((16, 512, 4096), {"split_k": 4}),
        ((16, 512, 4096), {"split_k": 1}),
    ],
    ids=["tma", "portable", "split_k", "small_m"],
)
def test_gpu_cached_launches_compute_each_calls_inputs(mnk: tuple[int, int, int], kwargs: dict) -> None:
    """After the first call per geometry, matmul_forward launches the compiled kernel directly (launch.py).

    Later calls must still read *their* inputs and write *their* outputs: fresh values, a new allocation,
    and a view at a 2-byte offset, which Triton must not treat as 16-byte aligned (a different binary).
    """
    m, n, k = mnk
    activation = kwargs.pop("activation", None)
    for seed in range(3):
        a, b = inputs(m, n, k, torch.bfloat16, seed=seed)
        y, _ = matmul_forward(a, b, activation, **kwargs)
        assert_close(y, reference64(a, b, activation), torch.bfloat16, k)
    if kwargs.get("use_tma") is not True:  # TMA needs 16-byte aligned rows and refuses this view
        storage = torch.randn(m * k + 1, device=DEVICE, dtype=torch.bfloat16)
        shifted = storage[1:].view(m, k)
        assert shifted.data_ptr() % 16 != 0
        y, _ = matmul_forward(shifted, b, activation, **kwargs)
        assert_close(y, reference64(shifted, b, activation), torch.bfloat16, k)
    # The TMA case is small enough to make its descriptors on the GPU (DEVICE_DESCRIPTOR_MAX_WORK).
    path = {
        "tma": matmul_module._TMA_DEVICE_DESCRIPTORS,
        "portable": matmul_module._PORTABLE,
        "split_k": matmul_module._SPLIT_K,
    }
    launches = path["tma" if kwargs.get("use_tma") else "split_k" if "split_k" in kwargs else "portable"]
    assert launches.entries, "the calls after the first should have gone through the launch cache"
