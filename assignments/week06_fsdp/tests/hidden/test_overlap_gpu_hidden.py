"""Hidden test that prefetch hides the all-gathers behind computation on 2 GPUs (task overlap_gpu).

The student's ranks run `scenarios.fsdp.profile_rank` in the sandbox on the task's two GPUs over NCCL: a bf16
Llama whose blocks compute longer than a block's gather takes (see OVERLAP_CONFIG), 2 steps unrecorded, then
STEPS steps under torch.profiler. The checker reads each rank's trace (`common.profiling.comm_overlap`) and
decides.

The criterion, on every rank, in the forward and in the backward of every recorded step: at least one NCCL
all-gather kernel runs at least MIN_COVERED of its time while compute kernels (any kernel not NCCL's) run on
another stream. A prefetched gather (started with async_op=True while the previous unit computes) runs on
NCCL's stream beside that unit's kernels, covered for most of its time; a gather the compute waits for at once
(a plain `unshard()` as a prefetch, or any gather on the compute stream) is covered for none of it: kernels of
one stream never overlap, and the streams wait on each other around a waited collective. Half lies far from
both. Why per kernel and not the share of all the gathers' time: an NCCL kernel lasts until the other rank's
arrives, so the first gather of a phase (the root's, which nothing precedes) grows with however far the two
hosts drift apart, and would weigh on a total by an amount no submission controls.

FSDP2 runs the same scenario here afterwards (`common.distributed.launch`, NCCL, on the same GPUs) and must
pass the same criterion: if it does not, the model is too small for this machine's GPUs, and the task is an
infrastructure error, never the student's zero.

What a submission could fake, and what not. The scenario (trusted code) starts and stops the profiler itself,
around its own calls into the model; the kernels are recorded by CUPTI, written by the profiler to the rank's
private /tmp and read back by the scenario; the submission reports nothing about overlap, and the checker
computes the verdict. But the scenario runs in the rank's process, next to the submission, which could patch
torch.profiler or the file to return a made-up trace, or launch busy kernels on a stream of its own so that
something "computes" beside serial gathers. Either is deliberate and plain in the submitted source. What it
cannot do by accident is pass with gathers the compute waits for: those leave no kernel to overlap.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from scenarios import fsdp

from common.distributed.launch import launch
from common.grading.client import Submission
from common.grading.faults import ReferenceRunError
from common.grading.ranks import RankRun
from common.profiling import comm_overlap

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"),
]
STEPS = 3  # recorded steps, after the scenario's 2 unrecorded ones (allocator, NCCL and cuBLAS warmed up)
MIN_COVERED = 0.5  # of an all-gather kernel's time, with compute running on another stream (docstring)


def gathers_without_overlap(trace: dict[str, Any]) -> list[str]:
    """Each phase of each recorded step whose all-gathers miss the criterion, said in words ([]: all pass)."""
    ranges = [f"{phase}#{k}" for k in range(STEPS) for phase in fsdp.PHASES]
    problems = []
    for name, kernels in comm_overlap(trace, comm="AllGather", ranges=ranges).items():
        phase, step = name.split("#")
        if not kernels:
            problems.append(f"no NCCL all-gather kernel in the {phase} of recorded step {step}")
            continue
        best = max(k.covered_fraction for k in kernels)
        if best < MIN_COVERED:
            problems.append(
                f"in the {phase} of recorded step {step}, none of the {len(kernels)} all-gather kernels ran "
                f"beside compute for {MIN_COVERED:.0%} of its time (the best: {best:.0%})"
            )
    return problems


def test_all_gathers_overlap_compute_in_forward_and_backward(submission: Submission) -> None:
    ours = RankRun.from_data(submission.run(fsdp.profile_on_gpus, STEPS)).returned(
        dict[str, list[dict[str, Any]]]
    )  # {"traceEvents": [...]}
    theirs = launch(fsdp.profile_rank, nprocs=2, args=(False, STEPS), backend="nccl", timeout_s=300)
    reference = [f"rank {rank}: {p}" for rank in range(2) for p in gathers_without_overlap(theirs[rank])]
    if reference:
        raise ReferenceRunError(
            f"FSDP2 itself does not overlap its all-gathers with compute on these GPUs ({reference[0]}): "
            "the scenario's OVERLAP_CONFIG is too small for them"
        )
    for rank in range(2):
        problems = gathers_without_overlap(ours[rank])
        assert not problems, (
            f"rank {rank}: {problems[0]} ({len(problems)} of {2 * STEPS} phases so): start the next unit's "
            "gather without waiting for it, and wait only when that unit needs it"
        )
