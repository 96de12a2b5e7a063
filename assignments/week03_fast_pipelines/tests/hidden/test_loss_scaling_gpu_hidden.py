"""Hidden tests of `fastpipe.loss_scaling` on a GPU (task loss_scaling_gpu): fp16 training with your scaler.

A small MLP trains on a fixed synthetic classification problem under `torch.autocast(float16)` (fp32 master
weights, fp16 activations and matmul gradients), once with your scaler (in your worker) and once with
`torch.amp.GradScaler` (here, in the checker), from the same initial weights on the same batches
(`scenarios/fp16_training.py`). Both runs do the same arithmetic: the scale is a power of two, so scaling and
unscaling are exact, and cuBLAS is bitwise reproducible for the same shapes on the same GPU. So the two runs
must skip the same steps, keep the same scale and end at the same loss.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from scenarios import fp16_training

from common.grading.client import Submission

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
STATIC, DYNAMIC = "fastpipe.loss_scaling:StaticLossScaler", "fastpipe.loss_scaling:DynamicLossScaler"
RUN = dict[str, list[float] | float]


def grad_scaler(**kwargs) -> torch.amp.GradScaler:
    return torch.amp.GradScaler(fp16_training.DEVICE, **kwargs)


def assert_trained_alike(ours: dict, reference: dict) -> None:
    # Premise: the run trains at all (the loss on the last batches falls well below its starting value).
    assert reference["final"] < 0.5 * reference["losses"][0], "premise: the reference run must train"
    assert ours["final"] < 0.5 * ours["losses"][0], f"your run did not train: final loss {ours['final']:.3f}"
    # Identical arithmetic would give identical losses; 1% leaves room for a scaler that rounds differently
    # (e.g. divides by the scale instead of multiplying by its inverse), while a scaler that lets an inf/NaN
    # step through ends at NaN, and one that forgets to unscale takes steps 2**k times too large and diverges.
    assert ours["final"] == pytest.approx(reference["final"], rel=1e-2), (
        f"final loss {ours['final']:.4f}, GradScaler's {reference['final']:.4f}"
    )


@pytest.mark.parametrize("clip", [None, 1.0], ids=["no clipping", "clipping"])
def test_dynamic_scaler_trains_like_gradscaler(submission: Submission, clip: float | None) -> None:
    # 2**24 overflows fp16 gradients at first, so the run backs off; growth_interval=50 makes it grow again.
    kwargs = dict(init_scale=2.0**24, growth_interval=50)
    reference = fp16_training.train(grad_scaler(**kwargs), clip)
    ours = submission.run(fp16_training.train, submission.new(DYNAMIC, **kwargs), clip, returns=RUN)
    scales = [kwargs["init_scale"], *reference["scales"]]
    assert any(b < a for a, b in pairwise(scales)), "premise: the reference run must back off"
    assert any(b > a for a, b in pairwise(scales)), "premise: the reference run must grow"
    assert ours["scales"] == reference["scales"], "the scale must follow GradScaler's step by step"
    assert_trained_alike(ours, reference)


def test_static_scaler_trains_like_gradscaler_with_fixed_scale(submission: Submission) -> None:
    # 2**8 never overflows here; GradScaler with growth_interval > STEPS keeps that same scale all run.
    reference = fp16_training.train(grad_scaler(init_scale=2.0**8, growth_interval=10 * fp16_training.STEPS))
    assert set(reference["scales"]) == {2.0**8}, "premise: the fixed scale must not overflow"
    ours = submission.run(fp16_training.train, submission.new(STATIC, 2.0**8), returns=RUN)
    assert set(ours["scales"]) == {2.0**8}, "a static scale must never change"
    assert_trained_alike(ours, reference)


def test_static_scaler_with_overflowing_scale_never_steps(submission: Submission) -> None:
    """2**40 overflows every fp16 gradient: every step must be skipped, so the weights never change."""
    seen = submission.run(
        fp16_training.steps_taken, submission.new(STATIC, 2.0**40), 20, returns=dict[str, list[bool] | bool]
    )
    assert seen["returned"] == [False] * 20, "every step was taken with inf/NaN gradients"
    assert seen["weights_changed"] is False, "the weights changed although every step overflowed"
