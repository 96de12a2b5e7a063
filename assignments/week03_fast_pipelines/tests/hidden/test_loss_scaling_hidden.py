"""Hidden tests of `fastpipe.loss_scaling` (task loss_scaling): checked against torch.amp.GradScaler.

Training runs here are synthetic (`scenarios/loss_scaling.py`): the "loss" is `sum(p * g)` over the
parameters, so backpropagating `scaler.scale(loss)` gives each parameter exactly `scale * g`, and the tests
choose the steps where `g` holds an inf, a NaN, or a finite value that overflows only once scaled (as fp16
gradients do). The same scenario function runs twice: with the student's scaler in its worker, and with
GradScaler on the CPU here, in the checker, with the same gradients and the same optimizer. Both runs must
agree step by step; whether a step was taken is read off the parameters, here.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Any

import pytest
import torch
from scenarios import loss_scaling

from common.grading.client import Remote, Submission
from common.grading.source_scan import scan_source

SHAPES = [(7,), (3, 4)]
OVERFLOW = 3e38  # finite in fp32 (max 3.4e38), inf once multiplied by any scale >= 2
STATIC, DYNAMIC = "fastpipe.loss_scaling:StaticLossScaler", "fastpipe.loss_scaling:DynamicLossScaler"
SCALERS = {"static": STATIC, "dynamic": DYNAMIC}

# Params after the same number of steps differ between the two scalers only by how the gradients were
# unscaled: GradScaler multiplies by fp32(1 / scale), a scaler that divides by the scale may round
# differently (one ulp, ~6e-8 relative) on every step; 60 momentum-SGD steps accumulate well under 1e-5.
PARAM_TOL = {"rtol": 1e-5, "atol": 1e-6}
Record = tuple[float, list[torch.Tensor], float]  # scale before the step, params after it, scale after it


def true_gradients(pattern: str, seed: int) -> list[list[torch.Tensor]]:
    """One list of gradients per character: '.' finite, 'I' inf, 'N' NaN, 'O' finite but overflowing once scaled."""
    generator = torch.Generator().manual_seed(seed)
    steps = []
    for kind in pattern:
        grads = [torch.randn(shape, generator=generator) for shape in SHAPES]
        bad_param = int(torch.randint(len(SHAPES), (), generator=generator))
        bad_value = {".": None, "I": math.inf, "N": math.nan, "O": OVERFLOW}[kind]
        if bad_value is not None:
            grads[bad_param].view(-1)[0] = bad_value
        steps.append(grads)
    return steps


def random_pattern(steps: int, p_bad: float, seed: int) -> str:
    generator = torch.Generator().manual_seed(seed)
    draws = torch.rand(steps, generator=generator).tolist()
    kinds = torch.randint(3, (steps,), generator=generator).tolist()
    return "".join("ION"[k] if u < p_bad else "." for u, k in zip(draws, kinds, strict=True))


def grad_scaler(**kwargs) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", **kwargs)


def train(submission: Submission, scaler: Remote, grads: list[list[torch.Tensor]], clip=None) -> list[Record]:
    """The training scenario with the student's scaler, in the worker."""
    return submission.run(
        loss_scaling.train, scaler, grads, clip, returns=list[tuple[float, list[torch.Tensor], float]]
    )


def stepped(records: list[Record]) -> list[bool]:
    """Whether each step changed the parameters (they start at zero)."""
    before = [[torch.zeros(shape) for shape in SHAPES]] + [params for _, params, _ in records[:-1]]
    return [
        any(not torch.equal(b, a) for b, a in zip(old, new, strict=True))
        for old, (_, new, _) in zip(before, records, strict=True)
    ]


def assert_same_trajectory(ours: list[Record], reference: list[Record]) -> None:
    assert len(ours) == len(reference), f"{len(ours)} steps recorded, {len(reference)} expected"
    for step, ((mine_before, mine, mine_after), (ref_before, ref, ref_after), took, ref_took) in enumerate(
        zip(ours, reference, stepped(ours), stepped(reference), strict=True)
    ):
        # GradScaler keeps its scale in fp32: compare to fp32 precision.
        assert mine_before == pytest.approx(ref_before, rel=1e-6), (
            f"scale before step {step}: {mine_before}, GradScaler {ref_before}"
        )
        assert took == ref_took, f"step {step}: stepped={took}, GradScaler {ref_took}"
        for p_mine, p_ref in zip(mine, ref, strict=True):
            torch.testing.assert_close(p_mine, p_ref, **PARAM_TOL, msg=f"params after step {step}")
        assert mine_after == pytest.approx(ref_after, rel=1e-6), (
            f"scale after step {step}: {mine_after}, GradScaler {ref_after}"
        )


DYNAMIC_CASES = {
    "isolated overflows": (dict(init_scale=2.0**10, growth_interval=3), "....O......I..N......"),
    "overflow runs": (dict(init_scale=2.0**16, growth_interval=2), "OOO..II...NNN.....O.O.O....."),
    "grow every step": (dict(init_scale=4.0, growth_interval=1), ".....O....I.N..."),
    "other factors": (
        dict(init_scale=2.0**12, growth_factor=3.0, backoff_factor=0.25, growth_interval=4),
        "..O.........I.....N...........",
    ),
    "random 60 steps": (dict(init_scale=2.0**14, growth_interval=5), random_pattern(60, 0.15, seed=3)),
}


@pytest.mark.parametrize("case", list(DYNAMIC_CASES))
def test_dynamic_scale_trajectory_matches_gradscaler(submission: Submission, case: str) -> None:
    kwargs, pattern = DYNAMIC_CASES[case]
    grads = true_gradients(pattern, seed=len(pattern))
    reference = loss_scaling.train(grad_scaler(**kwargs), grads)
    # The case must exercise both directions, or it could not tell a scaler that never grows or never backs off.
    scales = [kwargs["init_scale"]] + [after for _, _, after in reference]
    assert any(b > a for a, b in pairwise(scales)), "premise: the case must grow the scale"
    assert any(b < a for a, b in pairwise(scales)), "premise: the case must back off"
    assert_same_trajectory(train(submission, submission.new(DYNAMIC, **kwargs), grads), reference)


@pytest.mark.parametrize("clip", [0.5, 100.0])
def test_unscale_before_clipping_matches_gradscaler(submission: Submission, clip: float) -> None:
    """unscale_() then clipping then step(): step must not unscale a second time."""
    kwargs = dict(init_scale=2.0**8, growth_interval=4)
    grads = true_gradients("...O.....N....", seed=11)
    reference = loss_scaling.train(grad_scaler(**kwargs), grads, clip)
    assert_same_trajectory(train(submission, submission.new(DYNAMIC, **kwargs), grads, clip), reference)


def test_two_optimizers_match_gradscaler(submission: Submission) -> None:
    """Each optimizer is checked and stepped on its own; update() backs off if either overflowed."""
    generator = torch.Generator().manual_seed(5)
    # Per step: which optimizer's gradients go bad ("a" SGD, "b" Adam) and how ("." not at all).
    pattern = "a. a. bI aO b. a. b. a. a. bO a. b. a. aI b. a.".split()
    grads = []
    for which, kind in pattern:
        step = [torch.randn(5, generator=generator), torch.randn(5, generator=generator)]
        if kind != ".":
            step[0 if which == "a" else 1][2] = {"I": math.inf, "O": OVERFLOW}[kind]
        grads.append(step)
    kwargs = dict(init_scale=2.0**6, growth_interval=2)
    reference = loss_scaling.train_two_optimizers(grad_scaler(**kwargs), grads)
    ours = submission.run(
        loss_scaling.train_two_optimizers, submission.new(DYNAMIC, **kwargs), grads,
        returns=list[tuple[float, list[torch.Tensor]]],
    )  # fmt: skip
    assert len(ours) == len(reference), f"{len(ours)} steps recorded, {len(reference)} expected"
    for step, ((scale, params), (ref_scale, ref_params)) in enumerate(zip(ours, reference, strict=True)):
        assert scale == pytest.approx(ref_scale, rel=1e-6), (
            f"scale after step {step}: {scale}, GradScaler {ref_scale}"
        )
        for p, ref in zip(params, ref_params, strict=True):
            torch.testing.assert_close(p, ref, **PARAM_TOL, msg=f"params after step {step}")


@pytest.mark.parametrize("kind", ["I", "N", "O"])
@pytest.mark.parametrize("scaler", list(SCALERS))
def test_step_with_nonfinite_gradients_is_skipped(submission: Submission, scaler: str, kind: str) -> None:
    grad = torch.tensor([0.5, -1.0, 2.0, 0.25])
    grad[1] = {"I": -math.inf, "N": math.nan, "O": OVERFLOW}[kind]
    took, param, state, scale = submission.run(
        loss_scaling.skip_step, submission.new(SCALERS[scaler], 2.0**8), grad,
        returns=tuple[bool, torch.Tensor, int, float],
    )  # fmt: skip
    assert took is False, "step() must return False when it skips"
    assert torch.equal(param, torch.ones(4)), "a skipped step must not change the parameters"
    assert state == 0, "the optimizer's state (momentum) must not be touched by a skipped step"
    expected = 2.0**8 if scaler == "static" else 2.0**7  # static never changes; dynamic halves
    assert scale == expected, f"the scale after update() is {scale}, expected {expected}"


def test_static_scaler_keeps_its_scale_and_steps_on_true_gradients(submission: Submission) -> None:
    """Reference: plain SGD on the true gradients of the steps without inf/NaN."""
    pattern = "..O...I.N....O.."
    grads = true_gradients(pattern, seed=2)
    records = train(submission, submission.new(STATIC, 2.0**12), grads)
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in SHAPES]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    took = stepped(records)
    assert len(records) == len(pattern), f"{len(records)} steps recorded, {len(pattern)} expected"
    for step, (kind, step_grads, (before, mine, after)) in enumerate(
        zip(pattern, grads, records, strict=True)
    ):
        if kind == ".":
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
        assert took[step] == (kind == "."), f"step {step} ({kind!r}): stepped={took[step]}"
        assert before == after == 2.0**12, f"step {step}: the static scale changed to {after}"
        for p_mine, p_ref in zip(mine, params, strict=True):
            torch.testing.assert_close(p_mine, p_ref.detach(), **PARAM_TOL, msg=f"params after step {step}")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("scaler", list(SCALERS))
def test_scale_multiplies_the_loss(submission: Submission, scaler: str, dtype: str) -> None:
    seen = submission.run(
        loss_scaling.scale_loss,
        submission.new(SCALERS[scaler], 2.0**10),
        dtype,
        returns=dict[str, torch.Tensor],
    )
    value = 0.5 * 1.0 - 2.0 * 2.0 + 3.0 * 4.0  # exact in fp16 too
    assert seen["scaled"].dtype == getattr(torch, dtype), (
        f"the scaled loss is {seen['scaled'].dtype}, not {dtype}"
    )
    assert seen["scaled"].item() == value * 2.0**10, (
        "scale() must multiply the loss by the scale"
    )  # a power of two
    assert seen["loss"].item() == value, "scale() must not modify the loss in place"
    expected = torch.tensor([1.0, 2.0, 4.0]) * 2.0**10
    torch.testing.assert_close(seen["grad"], expected, rtol=0, atol=0, msg="gradients of the scaled loss")


def test_unscale_divides_gradients_and_reports_finiteness(submission: Submission) -> None:
    seen = submission.run(
        loss_scaling.unscale, submission.new(DYNAMIC, init_scale=2.0**5), returns=dict[str, Any]
    )
    assert seen["finite"] is True, "unscale_() must return True when every gradient is finite"
    assert type(seen["grad"]) is torch.Tensor, "the gradient after unscale_() must be a tensor"
    torch.testing.assert_close(
        seen["grad"], torch.tensor([1.0, -3.0, 0.125]), rtol=0, atol=0, msg="unscaled gradient"
    )
    assert seen["unused_grad"] is None, "parameters without a gradient are skipped"
    assert seen["stepped"] is True, "step() must return True when it steps"
    assert seen["finite_with_nan"] is False, "unscale_() must return False when a gradient is NaN"


def assert_raised_runtime_error(error: Any, word: str, action: str) -> None:
    assert error is not None, f"{action} must raise RuntimeError"
    classes = error["classes"]
    assert "RuntimeError" in classes and "NotImplementedError" not in classes, f"{action} raised {classes[0]}"
    assert word in error["message"], f"the error of {action} must say {word!r}: {error['message'][:120]!r}"


def test_unscale_twice_in_one_iteration_raises(submission: Submission) -> None:
    seen = submission.run(loss_scaling.unscale_twice, submission.new(STATIC, 2.0**4), returns=dict[str, Any])
    assert_raised_runtime_error(seen["second"], "already", "a second unscale_() in one iteration")
    assert type(seen["grad"]) is torch.Tensor and torch.equal(seen["grad"], torch.ones(2)), (
        "gradients divided twice"
    )
    assert seen["next_iteration"] is True, "update() must allow unscale_ again in the next iteration"


@pytest.mark.parametrize("scaler", list(SCALERS))
def test_update_without_step_raises(submission: Submission, scaler: str) -> None:
    seen = submission.run(
        loss_scaling.update_twice, submission.new(SCALERS[scaler], 2.0**4), returns=dict[str, Any]
    )
    assert_raised_runtime_error(seen["second"], "step", "update() without a step since the last update()")
    assert seen["scale"] == 2.0**4 and type(seen["scale"]) is float, (
        "a refused update() must not change the scale"
    )


def test_scaler_is_written_from_scratch(submission: Submission) -> None:
    """The submission must not name GradScaler or its private kernels, nor call them at run time."""
    names = scan_source(submission.source("fastpipe/loss_scaling.py"))
    used = sorted((names.identifiers | names.strings) & set(loss_scaling.FORBIDDEN))
    assert not used, f"loss_scaling.py uses {used}: write the scaler yourself"
    pattern = "..O..."
    records, calls = submission.run(
        loss_scaling.train_watching_for_grad_scaler,
        submission.new(DYNAMIC, init_scale=2.0**6, growth_interval=2),
        true_gradients(pattern, seed=1),
        returns=tuple[list[tuple[float, list[torch.Tensor], float]], list[str]],
    )
    assert not calls, f"the scaler called {sorted(set(calls))}: write the scaler yourself"
    assert stepped(records) == [kind == "." for kind in pattern], "steps with an overflow must be skipped"
