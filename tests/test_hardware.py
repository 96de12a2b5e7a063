"""common.hardware: the spec table, GPU name matching and the roofline arithmetic (CPU only)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from common import hardware  # noqa: E402
from common.hardware import (  # noqa: E402
    DTYPES,
    SPECS,
    GPUSpec,
    NoGPUError,
    UnknownGPUError,
    attainable_flops,
    default_device,
    dtype_key,
    gpu_spec,
    peak_flops,
    plot_roofline,
    ridge_point,
    spec_from_name,
)

EXPECTED = {"H100 SXM", "H100 PCIe", "H200", "A100 40GB", "A100 80GB", "L4", "T4", "RTX 4090"}


def test_table_has_the_course_gpus() -> None:
    assert EXPECTED <= set(SPECS)
    for key, spec in SPECS.items():
        assert spec.name == key


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_spec_sanity(spec: GPUSpec) -> None:
    p = spec.peak_flops
    assert set(p) <= set(DTYPES)
    assert "fp32" in p and "fp16" in p and "int8" in p  # every GPU in the table has these
    # Tensor cores beat CUDA cores; narrower types are at least as fast as wider ones.
    assert p["fp16"] > p["fp32"] >= p["fp64"]
    if "bf16" in p:
        assert p["bf16"] > p["fp32"] and p["bf16"] == p["fp16"]
    if "tf32" in p:
        assert p["fp32"] <= p["tf32"] < p["fp16"]
    if "fp8" in p:
        assert p["fp8"] == pytest.approx(2 * p["fp16"], rel=0.01)
    assert p["int8"] >= p["fp16"]
    # Plausible magnitudes: 1 TFLOP/s < bf16/fp16 peak < 5 PFLOP/s; 100 GB/s < bandwidth < 10 TB/s.
    assert 1e12 < p["fp16"] < 5e15
    assert 100e9 < spec.mem_bandwidth < 10e12
    assert 1 * 2**20 <= spec.l2_bytes < spec.memory_bytes
    assert 16 <= spec.sm_count <= 200


# Every row of SPECS against its source (named beside the row in common/hardware.py), written out again here
# so that a slip in the table fails: dense TFLOP/s (TOPS for int8), bandwidth TB/s, memory GiB, L2 MiB, SMs.
DATASHEETS = {
    "H100 SXM": ({"fp64": 66.9, "fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp8": 1978.9, "int8": 1978.9},
                 3.35, 80, 50, 132),
    "H100 PCIe": ({"fp64": 51, "fp32": 51, "tf32": 378, "bf16": 756.5, "fp8": 1513, "int8": 1513},
                  2.0, 80, 50, 114),
    "H200": ({"fp64": 66.9, "fp32": 66.9, "tf32": 494.7, "bf16": 989.4, "fp8": 1978.9, "int8": 1978.9},
             4.8, 141, 60, 132),
    "A100 40GB": ({"fp64": 19.5, "fp32": 19.5, "tf32": 156, "bf16": 312, "int8": 624}, 1.555, 40, 40, 108),
    "A100 80GB": ({"fp64": 19.5, "fp32": 19.5, "tf32": 156, "bf16": 312, "int8": 624}, 2.039, 80, 40, 108),
    "L4": ({"fp32": 30.3, "tf32": 60, "bf16": 121, "fp8": 242.5, "int8": 242.5}, 0.3, 24, 48, 58),
    "T4": ({"fp32": 8.1, "fp16": 65, "int8": 130}, 0.32, 16, 4, 40),
    "RTX 4090": ({"fp32": 82.6, "tf32": 82.6, "bf16": 165.2, "fp8": 330.3, "int8": 660.6}, 1.008, 24, 72, 128),
}  # fmt: skip


def test_every_row_is_checked() -> None:
    assert set(DATASHEETS) == set(SPECS)


@pytest.mark.parametrize("key", DATASHEETS)
def test_row_matches_its_datasheet(key: str) -> None:
    peaks, tb_per_s, memory_gib, l2_mib, sms = DATASHEETS[key]
    spec = SPECS[key]
    for dtype, tflops in peaks.items():
        assert spec.peak_flops[dtype] == pytest.approx(tflops * 1e12, rel=1e-6), f"{key} {dtype}"
    if "bf16" in peaks:
        assert spec.peak_flops["fp16"] == spec.peak_flops["bf16"]
    assert spec.mem_bandwidth == pytest.approx(tb_per_s * 1e12, rel=1e-6)
    assert spec.memory_bytes == memory_gib * 2**30
    assert spec.l2_bytes == l2_mib * 2**20
    assert spec.sm_count == sms


def test_datasheet_spot_checks() -> None:
    h100 = SPECS["H100 SXM"]
    assert SPECS["H200"].peak_flops == h100.peak_flops  # same chip, more and faster memory
    assert "bf16" not in SPECS["T4"].peak_flops and "fp8" not in SPECS["A100 40GB"].peak_flops


@pytest.mark.parametrize(
    ("key", "flops_per_clock_per_sm", "clock_ghz"),
    [
        ("H100 SXM", 4096, 1.83),  # Hopper: 4 tensor cores x 512 dense fp16 FMA per clock
        ("A100 40GB", 2048, 1.41),  # Ampere: 4 tensor cores x 256 dense fp16 FMA per clock
    ],
)
def test_tensor_core_peak_is_sms_times_rate_times_clock(
    key: str, flops_per_clock_per_sm: int, clock_ghz: float
) -> None:
    """A peak is FLOPs per clock per SM x SMs x the clock the datasheet assumes: the table agrees with that."""
    spec = SPECS[key]
    expected = flops_per_clock_per_sm * spec.sm_count * clock_ghz * 1e9
    assert spec.peak_flops["bf16"] == pytest.approx(expected, rel=2e-3)


@pytest.mark.parametrize(
    ("device_name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB"),
        ("NVIDIA A100-SXM4-40GB", "A100 40GB"),
        ("NVIDIA A100-PCIE-40GB", "A100 40GB"),
        ("NVIDIA L4", "L4"),
        ("Tesla T4", "T4"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ],
)
def test_name_matching(device_name: str, key: str) -> None:
    assert spec_from_name(device_name) is SPECS[key]


@pytest.mark.parametrize(
    "device_name",
    [
        "NVIDIA GeForce GTX 1080",
        "NVIDIA GH200 480GB",  # contains "H200" but is another part
        "NVIDIA L40S",  # starts like "L4"
        "NVIDIA H100 NVL",  # other clocks and memory than the SXM part
        "NVIDIA H200 NVL",
        "NVIDIA A100 80GB PCIe",  # 1.935 TB/s, not the SXM 2.039
        "NVIDIA GeForce RTX 4090 D",
    ],
)
def test_unknown_gpu_message(device_name: str) -> None:
    with pytest.raises(UnknownGPUError) as info:
        spec_from_name(device_name)
    msg = str(info.value)
    assert repr(device_name) in msg  # names the GPU
    assert "GPUSpec(" in msg and "SPECS[" in msg  # and says how to pass or register peaks


def test_registered_spec_is_found_by_exact_name(monkeypatch: pytest.MonkeyPatch) -> None:
    mine = GPUSpec("My GPU", {"fp32": 1e12, "fp16": 8e12}, 1e11, 8 * 2**30, 2**22, 20)
    monkeypatch.setitem(hardware.SPECS, "NVIDIA My GPU", mine)
    assert spec_from_name("NVIDIA My GPU") is mine


def test_gpuspec_rejects_bad_keys() -> None:
    with pytest.raises(ValueError, match="unknown dtype keys"):
        GPUSpec("x", {"float32": 1e12}, 1e11, 1, 1, 1)


def test_dtype_keys() -> None:
    assert dtype_key(torch.bfloat16) == "bf16"
    assert dtype_key("torch.float16") == dtype_key("half") == "fp16"
    assert dtype_key(torch.float8_e4m3fn) == "fp8"
    assert dtype_key("TF32") == "tf32"
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_key(torch.complex64)


def test_peak_flops_lookup_and_unsupported_dtype() -> None:
    h100 = SPECS["H100 SXM"]
    assert peak_flops(torch.bfloat16, h100) == h100.peak_flops["bf16"]
    assert peak_flops("float32", h100) == h100.peak_flops["fp32"]
    with pytest.raises(ValueError, match="T4 has no bf16 peak"):
        peak_flops(torch.bfloat16, SPECS["T4"])


def test_ridge_point_and_attainable_by_hand() -> None:
    h100 = SPECS["H100 SXM"]
    ridge = 989.4e12 / 3.35e12  # FLOP/s over bytes/s = FLOP/byte
    assert ridge_point(h100, "bf16") == pytest.approx(ridge)
    assert round(ridge) == 295
    # Below the ridge the memory roof binds: 10 FLOP/B x 3.35 TB/s = 33.5 TFLOP/s.
    assert attainable_flops(10.0, h100, "bf16") == pytest.approx(33.5e12)
    assert isinstance(attainable_flops(10.0, h100, "bf16"), float)
    # Above it the compute roof does; at the ridge both agree.
    assert attainable_flops(1000.0, h100, "bf16") == pytest.approx(989.4e12)
    assert attainable_flops(ridge, h100, "bf16") == pytest.approx(989.4e12)
    x = np.array([1.0, ridge, 1e4])
    np.testing.assert_allclose(attainable_flops(x, h100, "bf16"), [3.35e12, 989.4e12, 989.4e12])


def test_plot_roofline_draws_on_agg() -> None:
    fig, ax = plt.subplots()
    try:
        points = {"matmul 4096³": (1365.0, 700e12), "vector add": (1 / 12, 0.25e12)}
        out = plot_roofline(ax, SPECS["H100 SXM"], torch.bfloat16, points)
        assert out is ax
        assert ax.get_xscale() == "log" and ax.get_yscale() == "log"
        texts = {t.get_text() for t in ax.texts}
        assert {"matmul 4096³", "vector add"} <= texts
        assert any(t.startswith("ridge: 295") for t in texts)
        labels = [line.get_label() for line in ax.get_lines()]
        assert any("memory roof" in label for label in labels)
        assert any("compute roof" in label for label in labels)
        lo, hi = ax.get_xlim()
        assert lo <= 1 / 12 and hi >= 1365  # every point is inside the plot
        fig.canvas.draw()  # and it renders
    finally:
        plt.close(fig)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_cpu_only_machine() -> None:
    assert default_device() == torch.device("cpu")
    with pytest.raises(NoGPUError, match="no CUDA GPU is available"):
        gpu_spec()
    with pytest.raises(NoGPUError):
        peak_flops("bf16")


@pytest.mark.gpu
def test_current_gpu_is_cuda() -> None:
    assert default_device().type == "cuda"
    try:
        spec = gpu_spec()
    except UnknownGPUError:
        pytest.skip(f"{torch.cuda.get_device_name()} is not in the spec table")
    props = torch.cuda.get_device_properties(default_device())
    assert spec.sm_count == props.multi_processor_count
    assert spec.l2_bytes == props.L2_cache_size
