"""Hidden test of SyncBatchNorm inside torch's DDP on 2 GPUs over NCCL (task ddp_syncbn_gpu).

The student's ranks run in the sandbox on the task's two GPUs; the reference, the same step with
nn.SyncBatchNorm, runs here in the checker on the same GPUs afterwards (`common.distributed.launch`). The two
runs must agree on the losses, the parameters and the BatchNorm buffers after every step, up to float32
rounding (NCCL's reduction order is not ours).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scenarios import ddp_syncbn

from common.distributed.launch import launch
from common.grading.client import Submission
from common.grading.ranks import RankRun

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]


def test_ddp_step_with_your_syncbn_equals_torch_syncbn(submission: Submission) -> None:
    ours = RankRun.from_data(submission.run(ddp_syncbn.train_with_student_syncbn)).returned(dict[str, Any])
    reference = launch(ddp_syncbn.train_rank, nprocs=2, args=(False,), backend="nccl", timeout_s=300)
    for rank in range(2):
        theirs = reference[rank]
        assert ours[rank]["losses"] == pytest.approx(theirs["losses"], rel=1e-4, abs=1e-5), (
            f"rank {rank}: losses {ours[rank]['losses']}, with nn.SyncBatchNorm {theirs['losses']}"
        )
        for name, expected in theirs["state"].items():
            if name.endswith("num_batches_tracked"):
                continue  # nn.SyncBatchNorm counts steps; the assignment's module need not
            got = ours[rank]["state"].get(name)
            assert type(got) is torch.Tensor, f"rank {rank}: the model has no {name}"
            torch.testing.assert_close(
                got, expected, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name} after the steps"
            )
