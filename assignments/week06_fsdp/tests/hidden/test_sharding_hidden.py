"""Hidden tests of `myfsdp.sharding` and `shard_model`'s units (task sharding).

After `shard_model`, every parameter of the Llama must be what FSDP2 makes of it: an nn.Parameter holding a
DTensor placed `Shard(0)` on the mesh of every rank, of the whole parameter's shape, whose local tensor is the
rank's block of rows (torch.chunk's cut: blocks of ceil(n / p) rows, the last shorter; vocab 66 on 4 ranks
gives 17, 17, 17, 15). Expected: FSDP2's layout from the checker's own run, and the rows of the initial
parameters, rebuilt here from the scenario's seed. The layout is reported from inside the ranks (see
`scenarios/fsdp.py`).
"""

from __future__ import annotations

import pytest
import torch
from fsdp2_runs import fsdp2, ours, returned
from scenarios import fsdp

from common.grading.client import Submission
from common.grading.ranks import RankRun


@pytest.mark.parametrize("ranks", [2, 4])
def test_every_parameter_is_a_dtensor_sharded_on_dim_0_like_fsdp2s(
    submission: Submission, ranks: int
) -> None:
    seen, expected = returned(ours(submission, ranks, 0)), returned(fsdp2(ranks, 0))
    whole = dict(fsdp.initial_model().named_parameters())
    for rank in range(ranks):
        layout, reference = seen[rank]["layout"], expected[rank]["layout"]
        assert sorted(layout) == sorted(reference), (
            f"rank {rank}: the model's parameters are {sorted(layout)}, expected {sorted(reference)}"
        )
        for name, theirs in reference.items():
            mine = layout[name]
            assert mine["dtensor"] is True, f"rank {rank}: {name} is not a DTensor after shard_model"
            for key in ("placements", "mesh", "shape"):
                assert mine[key] == theirs[key], (
                    f"rank {rank}: {name}'s {key} is {mine[key]}, expected {theirs[key]}"
                )
            blocks = (
                whole[name].detach().chunk(ranks)
            )  # fewer than ranks when rows < ranks: the rest are empty
            rows = blocks[rank] if rank < len(blocks) else whole[name].detach()[:0]
            local = mine["local"]
            assert type(local) is torch.Tensor and local.shape == theirs["local"].shape, (
                f"rank {rank}: {name}'s local shard has shape {list(getattr(local, 'shape', []))}, expected "
                f"{list(theirs['local'].shape)} (blocks of ceil(rows / ranks) rows)"
            )
            # exact: a copy of the initial rows, computed here from the scenario's seed
            torch.testing.assert_close(local, rows, rtol=0, atol=0, msg=f"rank {rank}: {name}'s local rows")


def test_a_model_other_than_the_llama_is_refused_with_type_error(submission: Submission) -> None:
    ran = RankRun.from_data(submission.run(fsdp.shard_something_else, 2))
    for rank, error in enumerate(ran.errors):
        assert error is not None and "TypeError" in error["kinds"], (
            f"rank {rank}: expected TypeError for an nn.Linear, got "
            f"{'a result' if error is None else error['name'] + ': ' + error['line']}"
        )
        assert ran.collectives[rank] == [], f"rank {rank} communicated before it raised"
