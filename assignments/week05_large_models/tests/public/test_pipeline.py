"""Public tests of `largemodels.pipeline`: the 1F1B order, and one step equal to the whole model's.

The ranks run on the grader's own process group (the hub of `common.grading.ranks`), whose sends never wait
for their receives. The hidden tests also train 3 stages and 1 micro-batch for several steps, compare every
parameter after every step, and check the order of every stage's sends and receives against 1F1B.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from conftest import on_hub
from torch import nn

M, SIZE, WIDTH = 4, 3, 5


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh(), nn.Linear(WIDTH, WIDTH), nn.Tanh()).double()


def batch() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    inputs = [torch.randn(SIZE, WIDTH, generator=generator, dtype=torch.float64) for _ in range(M)]
    return inputs, [torch.randn(SIZE, WIDTH, generator=generator, dtype=torch.float64) for _ in range(M)]


def rank_step() -> dict:
    # in the rank only: the hub's process must not import the submission
    from largemodels.pipeline import one_f_one_b_step

    rank = dist.get_rank()
    stage = model()[2 * rank : 2 * rank + 2]  # stage 0: the first linear layer and tanh; stage 1: the second
    inputs, targets = batch()
    losses = one_f_one_b_step(
        stage, M, inputs if rank == 0 else None, targets if rank == 1 else None, F.mse_loss, (SIZE, WIDTH)
    )
    return {"losses": losses, "grads": [p.grad for p in stage.parameters()]}


def orders() -> list:
    from largemodels.pipeline import one_f_one_b_order

    return [one_f_one_b_order(2, 4, 0), one_f_one_b_order(2, 4, 1)]


def test_the_order() -> None:
    first, second = on_hub(orders, 1, module="largemodels.pipeline")[0]
    assert first == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("F", 3), ("B", 2), ("B", 3)]
    assert second == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2), ("F", 3), ("B", 3)]


def test_one_step_equals_the_whole_model() -> None:
    results = on_hub(rank_step, 2, module="largemodels.pipeline")
    whole = model()
    inputs, targets = batch()
    losses = [F.mse_loss(whole(x), t) for x, t in zip(inputs, targets, strict=True)]
    (sum(losses) / M).backward()
    assert results[1]["losses"] == [loss.item() for loss in losses]
    assert results[0]["losses"] is None
    grads = [p.grad for p in whole.parameters()]
    for ours, expected in zip(results[0]["grads"] + results[1]["grads"], grads, strict=True):
        torch.testing.assert_close(ours, expected)
