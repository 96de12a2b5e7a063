"""Printing from every rank in rank order: the smallest program whose output depends on synchronisation.

N processes that each `print` write to the same terminal (or log file) in whatever order the operating system
runs them: rank 3 may well come first. To get rank order, rank r must not print before ranks 0..r-1 have,
and what they printed must have left their processes: `print` into a pipe or a file is buffered, so a line
that was "printed" may sit in a buffer until the process exits. Flush.
"""

from __future__ import annotations

import torch.distributed as dist


def print_in_rank_order(text: str) -> None:
    """Print one line `rank R of W: TEXT` from every rank, rank 0's first, then rank 1's, up to rank W-1's.

    A collective: every rank of the default process group calls it, each with its own text (one line, no
    newline in it). When it returns on any rank, every rank's line has been printed and flushed, so two calls
    in a row never interleave: all lines of the first call come before all lines of the second. Use
    torch.distributed for the synchronisation (barriers, or passing a token with send/recv).
    """
    # BEGIN SOLUTION: print_in_rank_order: let each rank print and flush its line in turn, synchronising with barriers
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for turn in range(world_size):
        if turn == rank:
            print(f"rank {rank} of {world_size}: {text}", flush=True)
        dist.barrier()  # every rank waits until the rank whose turn it was has printed and flushed
    # END SOLUTION
