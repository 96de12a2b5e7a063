"""Hidden test of `largemodels.offload` (task offload, 1 GPU).

A stack of 8 Linear(4096, 4096) + GELU layers: 512 MiB of float32 parameters and as much again of gradients,
against a budget of 384 MiB of GPU memory. The budget is measured here, in the checker, from outside the
submission's process: a thread samples the GPU's used memory (cudaMemGetInfo) while the step runs, and the peak
above the baseline (taken once the worker has started CUDA and cuBLAS) must stay under the budget plus a slack
for what the worker's CUDA context may still load lazily (kernels' code). Keeping every layer's parameters on
the GPU needs 512 MiB for them alone, more than budget and slack together.

Reference: the same layers in float64 on the CPU, here, with the same gradients already in .grad.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.nn.functional as F
from scenarios import offload

from common.grading.client import Submission

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

WIDTH, DEPTH, BATCH = 4096, 8, 64
MIB = 2**20
BUDGET = 384 * MIB  # one or two layers' weights and gradients (128 MiB each) + cuBLAS workspace + activations
SLACK = 64 * MIB  # lazily loaded kernel code and the like, outside the caching allocator
SEED = 7  # of the random vectors the weight gradients are projected on
# float32 on the GPU against float64: each matmul sums 4096 products, relative error ~sqrt(4096) * 2^-24
# ~ 4e-6, compounded over 8 layers and 3 matmuls per layer: well under 1e-3 of the values' scale.
RTOL = 1e-3


def reference(data: dict) -> dict:
    """The whole stack on the CPU in float64: output, bias gradients, projections of the weight gradients."""
    h = data["x"].double()
    params = [[t.double().requires_grad_(True) for t in layer] for layer in data["weights"]]
    for weight, bias in params:
        h = F.gelu(h @ weight.T + bias)
    h.backward(data["grad"].double())
    generator = torch.Generator().manual_seed(SEED)
    seen: dict = {"out": h.detach(), "bias": [], "rows": [], "columns": []}
    for (weight, bias), (weight_grad, bias_grad) in zip(params, data["grads"], strict=True):
        g = weight.grad + weight_grad.double()
        u = torch.randn(g.shape[0], generator=generator, dtype=torch.float64)
        v = torch.randn(g.shape[1], generator=generator, dtype=torch.float64)
        seen["bias"].append(bias.grad + bias_grad.double())
        seen["rows"].append(g @ v)
        seen["columns"].append(u @ g)
    return seen


class PeakSampler:
    """The GPU's used memory (total - free, every process on it), sampled every 0.2 ms on a thread."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def used() -> int:
        free, total = torch.cuda.mem_get_info(0)
        return total - free

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used())
            time.sleep(0.0002)

    def __enter__(self) -> PeakSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def close(ours: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert type(ours) is torch.Tensor and ours.shape == expected.shape, (
        f"{what}: expected a tensor of shape {list(expected.shape)}, got {list(getattr(ours, 'shape', []))}"
    )
    scale = expected.abs().max().item()
    torch.testing.assert_close(ours.double(), expected, rtol=RTOL, atol=RTOL * scale, msg=what)


def test_offloaded_step_equals_the_whole_model_and_stays_under_the_budget(submission: Submission) -> None:
    ref = reference(offload.make(0, WIDTH, DEPTH, BATCH))
    submission.run(offload.warm_up, returns=int)
    time.sleep(0.5)  # let the worker's start-up settle before the baseline
    baseline = PeakSampler.used()
    with PeakSampler() as sampler:
        seen = submission.run(offload.train, 0, [WIDTH, DEPTH, BATCH], BUDGET, SEED, returns=dict)
    assert sampler.peak - baseline <= BUDGET + SLACK, (
        f"the step used {(sampler.peak - baseline) / MIB:.0f} MiB of GPU memory at its peak, measured from "
        f"outside; the budget is {BUDGET / MIB:.0f} MiB (+{SLACK / MIB:.0f} MiB slack)"
    )
    assert seen["on_cpu"] == [True] * DEPTH, "the layers' parameters must end on the CPU"
    close(seen["out"], ref["out"], "the output")
    for i in range(DEPTH):
        close(seen["bias"][i], ref["bias"][i], f"layer {i}'s bias gradient (added to the one it had)")
        close(seen["rows"][i], ref["rows"][i], f"layer {i}'s weight gradient (times a random vector)")
        close(
            seen["columns"][i], ref["columns"][i], f"layer {i}'s weight gradient (a random vector times it)"
        )
