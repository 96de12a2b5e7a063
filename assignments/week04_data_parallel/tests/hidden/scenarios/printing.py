"""Runs in the submission's worker: `print_in_rank_order` on every rank, through the grader's hub.

The hub starts the ranks highest first, each until its first collective, and lets them exit highest first:
lines printed without synchronising, or left unflushed, come out reversed. What comes back is the ranks'
stdout as it arrived (the tests decide whether it is right).
"""

from __future__ import annotations

import torch.distributed as dist

from common.grading.ranks import run_ranks


def _print_calls(texts_per_call: list[list[str]]) -> None:
    from dataparallel.printing import print_in_rank_order

    for texts in texts_per_call:
        print_in_rank_order(texts[dist.get_rank()])


def print_calls(texts_per_call: list[list[str]]) -> dict:
    """Call print_in_rank_order once per entry; entry k holds each rank's text for call k."""
    world_size = len(texts_per_call[0])
    return run_ranks(_print_calls, [(texts_per_call,)] * world_size, package="dataparallel")
