"""Hidden tests of `largemodels.pipeline` (task pipeline_1f1b, bonus).

Reference: the whole model (every stage's layers in a row) trained here, in the checker, in float64 on the
whole batch, loss = the mean over the micro-batches of their MSE, plain SGD: its parameters after every step
and each micro-batch's loss must equal the pipeline's. The order of each stage's sends and receives, from the
hub's log, must be 1F1B's, and so must its memory: the grader's stage (`scenarios.pipeline.CountedStage`)
counts the micro-batches whose saved activations are alive at once, which 1F1B bounds by min(p - s, m) on
stage s of p. GPipe computes the same numbers but keeps all m alive on stage 0, and stage 0, which receives
nothing, can run GPipe's forwards early and still send in 1F1B's order: only the count catches that.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from scenarios import pipeline

from common.grading.client import Submission
from common.grading.ranks import Collective, RankRun

# float64 throughout; the pipeline runs the same operations per micro-batch as the reference runs on the
# whole batch, summed in another order: a few ulps per step, far below 1e-10 after 3 steps of lr 0.1.
TOLERANCE = {"rtol": 1e-10, "atol": 1e-10}
WIDTH, LR, STEPS = 6, 0.1, 3
# name: (stages, layers per stage, micro-batches, micro-batch size)
CASES = {
    "2 stages, 4 micro-batches": (2, 2, 4, 3),
    "3 stages, 5 micro-batches": (3, 1, 5, 2),
    "2 stages, 1 micro-batch": (2, 1, 1, 4),
}


def make(stages: int, layers: int, m: int, size: int, seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float64)

    weights = [
        [[draw(WIDTH, WIDTH) / WIDTH**0.5, draw(WIDTH) / 10] for _ in range(layers)] for _ in range(stages)
    ]
    inputs = [[draw(size, WIDTH) for _ in range(m)] for _ in range(STEPS)]
    targets = [[draw(size, WIDTH) / 2 for _ in range(m)] for _ in range(STEPS)]
    return {"weights": weights, "inputs": inputs, "targets": targets, "m": m, "shape": [size, WIDTH]}


def reference(data: dict[str, Any]) -> dict[str, list]:
    """The whole model on one process: each step's per-micro-batch losses, every stage's parameters after it."""
    params = [
        [[t.clone().requires_grad_(True) for t in layer] for layer in stage] for stage in data["weights"]
    ]
    losses, after = [], []
    for step in range(STEPS):
        step_losses = []
        total = torch.zeros((), dtype=torch.float64)
        for x, target in zip(data["inputs"][step], data["targets"][step], strict=True):
            for stage in params:
                for weight, bias in stage:
                    x = torch.tanh(x @ weight.T + bias)
            loss = F.mse_loss(x, target)
            step_losses.append(loss.item())
            total = total + loss / data["m"]
        total.backward()
        with torch.no_grad():
            for stage in params:
                for layer in stage:
                    for t in layer:
                        t -= LR * t.grad
                        t.grad = None
        losses.append(step_losses)
        after.append([[t.detach().clone() for layer in stage for t in layer] for stage in params])
    return {"losses": losses, "params": after}


def expected_messages(stages: int, m: int, stage: int) -> list[tuple[str, int]]:
    """Stage `stage`'s sends and receives in one 1F1B step, (kind, peer), written out from the schedule."""
    warmup = min(stages - stage - 1, m)
    actions = [("F", i) for i in range(warmup)]
    for i in range(warmup, m):
        actions += [("F", i), ("B", i - warmup)]
    actions += [("B", i) for i in range(m - warmup, m)]
    messages = []
    for kind, _ in actions:
        if kind == "F":
            messages += [("recv", stage - 1)] if stage > 0 else []
            messages += [("send", stage + 1)] if stage < stages - 1 else []
        else:
            messages += [("recv", stage + 1)] if stage < stages - 1 else []
            messages += [("send", stage - 1)] if stage > 0 else []
    return messages


def in_flight_bound(stages: int, m: int, stage: int) -> int:
    """The most micro-batches whose activations stage s of p holds at once under 1F1B: the w = min(p - s - 1, m)
    warm-up forwards, plus the one each steady-phase forward adds before the backward that frees the oldest;
    w = m (no steady phase) when there are fewer micro-batches than that: m."""
    return min(stages - stage, m)


def check_in_flight(seen: list[dict[str, Any]], m: int) -> None:
    """Each stage's count of micro-batches in flight, per step, within 1F1B's bound."""
    stages = len(seen)
    for s in range(stages):
        counts, bound = seen[s]["in_flight"], in_flight_bound(stages, m, s)
        assert type(counts) is list and all(type(n) is int and n <= bound for n in counts), (
            f"stage {s} of {stages} held the activations of {counts} micro-batches at once (per step); 1F1B "
            f"holds at most {bound}: run each backward as soon as the schedule allows, and let a micro-batch's "
            "activations go with its backward"
        )


def run(submission: Submission, data: dict[str, Any]) -> RankRun:
    return RankRun.from_data(
        submission.run(
            pipeline.train, data["weights"], data["m"], data["inputs"], data["targets"], data["shape"], LR
        )
    )


def steps_of(log: list[Collective], rank: int) -> list[list[Collective]]:
    """The rank's collectives of each step, split at the scenario's barriers."""
    kinds = [c.kind for c in log]
    assert kinds.count("barrier") == STEPS, f"rank {rank} made barriers of its own: {kinds}"
    parts: list[list[Collective]] = []
    for c in log:
        if c.kind == "barrier":
            parts.append([])
        else:
            parts[-1].append(c)
    return parts


@pytest.mark.parametrize("case", list(CASES))
def test_parameters_and_losses_equal_the_whole_model_trained_on_one_process(submission: Submission,
                                                                             case: str) -> None:  # fmt: skip
    stages, layers, m, size = CASES[case]
    data = make(stages, layers, m, size)
    seen = run(submission, data).returned(dict[str, Any])
    ref = reference(data)
    for step in range(STEPS):
        losses = seen[stages - 1]["losses"][step]
        assert losses == pytest.approx(ref["losses"][step], rel=1e-10, abs=1e-12), (
            f"step {step}: the last stage's losses {losses}, on one process {ref['losses'][step]}"
        )
        for s in range(stages):
            ours, expected = seen[s]["params"][step], ref["params"][step][s]
            assert len(ours) == len(expected), f"stage {s} returned {len(ours)} parameters"
            for k, (a, b) in enumerate(zip(ours, expected, strict=True)):
                assert type(a) is torch.Tensor and a.shape == b.shape and a.dtype == torch.float64, (
                    f"stage {s}, parameter {k}: expected a float64 tensor of shape {list(b.shape)}"
                )
                torch.testing.assert_close(
                    a, b, **TOLERANCE, msg=f"stage {s}, parameter {k} after step {step}"
                )
    for s in range(stages - 1):
        assert seen[s]["losses"] == [None] * STEPS, f"stage {s} is not the last: it returns None"


@pytest.mark.parametrize("case", list(CASES))
def test_sends_receives_and_activations_alive_follow_1f1b(submission: Submission, case: str) -> None:
    stages, layers, m, size = CASES[case]
    ran = run(submission, make(stages, layers, m, size, seed=1))
    seen = ran.returned(dict[str, Any])
    world = tuple(range(stages))
    check_in_flight(seen, m)
    for s in range(stages):
        expected = expected_messages(stages, m, s)
        for step, part in enumerate(steps_of(ran.collectives[s], s)):
            ours = [(c.kind, c.root) for c in part]
            assert ours == expected and all(c.group == world for c in part), (
                f"stage {s}, step {step}: sends and receives {ours}; 1F1B's are {expected}"
            )


def test_one_stage_does_not_communicate(submission: Submission) -> None:
    data = make(1, 2, 3, 2, seed=2)
    ran = run(submission, data)
    seen = ran.returned(dict[str, Any])
    ref = reference(data)
    for step in range(STEPS):
        for a, b in zip(seen[0]["params"][step], ref["params"][step][0], strict=True):
            torch.testing.assert_close(a, b, **TOLERANCE)
    assert [c.kind for c in ran.collectives[0]] == ["barrier"] * STEPS, "one stage needs no messages"
    check_in_flight(seen, data["m"])
