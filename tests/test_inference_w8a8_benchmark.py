"""The week-9 assignment's W8A8 benchmark script (assignments/week09_inference_algorithms/benchmark_w8a8.py).

The script is loaded by path, as it is run: it is no package. Its quick run times the reference GEMM under
Triton's interpreter on a CPU (speed means nothing there; the layout and the correctness check do); the goal
is computed from rows given here; the full run refuses a machine without a GPU.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from common.hardware import NoGPUError
from common.weeks import REPO_ROOT

SCRIPT = REPO_ROOT / "assignments" / "week09_inference_algorithms" / "benchmark_w8a8.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("benchmark_w8a8", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_goal_is_the_worst_speedup_at_large_m_and_ignores_decode_shapes(script) -> None:
    rows = [{"m": 16, "speedup": 0.5}, {"m": 4096, "speedup": 1.6}, {"m": 8192, "speedup": 1.35}]
    goal = script.speedup_goal(rows)
    assert goal["speedup"] == 1.35 and goal["met"] is (1.35 >= script.GOAL_SPEEDUP)
    assert script.speedup_goal([*rows[:2], {"m": 8192, "speedup": 1.2}])["met"] is False
    assert script.speedup_goal(rows[:1]) | {"metric": None} == {  # no large shape: nothing to meet
        "metric": None, "op": ">=", "value": script.GOAL_SPEEDUP, "speedup": None, "met": False,
    }  # fmt: skip


def test_exact_rows_is_the_scaled_integer_product(script) -> None:
    x_q, x_scale, w_q, w_scale = script.operands(9, 5, 300, torch.device("cpu"), seed=1)
    expected = torch.empty(3, 5, dtype=torch.float64)  # rows 0, 4, 8, element by element in Python integers
    for i, m in enumerate(range(0, 9, 4)):
        for n in range(5):
            total = sum(int(a) * int(b) for a, b in zip(x_q[m].tolist(), w_q[n].tolist(), strict=True))
            expected[i, n] = total * float(x_scale[m]) * float(w_scale[n])
    torch.testing.assert_close(script.exact_rows(x_q, x_scale, w_q, w_scale, 4), expected, rtol=1e-15, atol=0)


def test_the_quick_run_checks_and_times_every_shape(script, tmp_path) -> None:
    path = script.run(tmp_path, quick=True)
    assert path.name == "inference_w8a8_quick.json"
    saved = json.loads(path.read_text())
    assert [(r["m"], r["n"], r["k"]) for r in saved["shapes"]] == list(script.QUICK_SHAPES)
    for row in saved["shapes"]:
        compared = row["comparison"]
        assert row["speedup"] == compared["speedup"] > 0
        assert compared["baseline"]["flops"] == 2 * row["m"] * row["n"] * row["k"]
    assert saved["goal"]["speedup"] is None and saved["goal"]["met"] is False  # no M >= 4096 in a quick run
    assert saved["quick"] is True and "device" in saved["environment"]


def test_the_full_run_needs_a_gpu(script) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the full run would run")
    with pytest.raises(NoGPUError, match="--quick"):
        script.run(Path("unused"), quick=False)


@pytest.mark.gpu
def test_the_quick_run_on_a_gpu_compiles_the_kernel_and_checks_it_gpu(script, tmp_path) -> None:
    saved = json.loads(script.run(tmp_path, quick=True).read_text())
    assert [row["m"] for row in saved["shapes"]] == [m for m, _, _ in script.QUICK_SHAPES]
