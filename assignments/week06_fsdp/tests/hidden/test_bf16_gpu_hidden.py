"""Hidden test of `shard_model` on 2 GPUs over NCCL with a bf16 model (task bf16_gpu).

The student's ranks run in the sandbox on the task's two GPUs (`scenarios.fsdp.train_on_gpus`); FSDP2 runs the
same scenario here in the checker on the same GPUs afterwards (`common.distributed.launch`, NCCL). Both train
the bf16 model for 3 SGD steps. bf16 keeps 8 bits of mantissa (relative steps of 2**-8 = 0.4%) and NCCL's
reduction order is not fixed: losses within 2%, parameters within rtol 2e-2 and atol 1e-2 (an unaveraged
gradient is p = 2 times too large and moves the parameters by far more after a step of lr 0.5).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scenarios import fsdp

from common.distributed.launch import launch
from common.grading.client import Submission
from common.grading.ranks import RankRun

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
STEPS = 3


def test_bf16_training_on_two_gpus_equals_fsdp2s(submission: Submission) -> None:
    ours = RankRun.from_data(submission.run(fsdp.train_on_gpus, STEPS)).returned(dict[str, Any])
    theirs = launch(fsdp.train_rank, nprocs=2, args=(False, STEPS, "cuda"), backend="nccl", timeout_s=300)
    for rank in range(2):
        mine, expected = ours[rank], theirs[rank]
        losses = [float(s["loss"]) for s in mine["steps"]]
        reference = [float(s["loss"]) for s in expected["steps"]]
        assert losses == pytest.approx(reference, rel=2e-2), (
            f"rank {rank}: losses {losses}, FSDP2's {reference}"
        )
        for name, value in expected["parameters"].items():
            got = mine["parameters"].get(name)
            assert type(got) is torch.Tensor and got.dtype == torch.bfloat16, (
                f"rank {rank}: {name} is not a bf16 shard after the steps"
            )
            torch.testing.assert_close(
                got.float(), value.float(), rtol=2e-2, atol=1e-2, msg=f"rank {rank}: {name}"
            )
