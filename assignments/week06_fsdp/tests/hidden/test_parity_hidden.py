"""Hidden tests of training with `shard_model` (task parity): the same numbers as FSDP2.

Three SGD steps of the small Llama (vocab 66 and d_ff 40, so shards are padded on 4 ranks) on 2 and 4 ranks
of the grader's hub, each rank on its slice of the batch; FSDP2 runs the same scenario in this checker. Per
step: the loss (mean over the ranks), the whole gradient of every parameter (each rank's local shard, put
together here in rank order) and its norm; after the last step, the whole parameters.

Tolerances: the two runs do the same float32 operations on the same data, and the reference equals FSDP2
bit for bit here (on 2 and 4 ranks, dividing by p is exact, so its divide-then-sum equals FSDP2's AVG). A
correct submission may still add in another order (its own packing, a division after the sum): an ulp or so
per step. The largest gradient entry of a parameter is between about 2e-4 and 0.15, parameters are of order
1e-2..1; rtol 1e-5 with atol 1e-7 (gradients) or 1e-6 (losses, parameters) leaves a wide margin over those
ulps, and a gradient not averaged (p times too large) or reduced from the wrong rows fails it by orders of
magnitude.

The task requires your own mechanism: the submitted sources must not name torch's FSDP or the course's, nor
import or run code chosen at run time (checked here, on the submitted text, as part of each test).
"""

from __future__ import annotations

import pytest
import torch
from fsdp2_runs import fsdp2, ours, returned
from scenarios import fsdp

from common.grading.client import Submission
from common.grading.source_scan import scan_source

STEPS = 3
FILES = ("myfsdp/fsdp.py", "myfsdp/unit.py", "myfsdp/sharding.py")
# Named anywhere (an import, a string that is not a docstring): torch's FSDP and the course's sharding.
LIBRARIES = (*fsdp.OFF_LIMITS, "fully_shard", "FSDPModule", "apply_fsdp", "ZeroOptimizer")
# Used as a name: what imports or runs code chosen at run time, or takes the grader's import refusal away.
BUILTINS = ("exec", "eval", "compile", "__import__", "importlib", "meta_path", "import_module")


def whole(rank_values: list[dict], step: int | None, name: str) -> torch.Tensor:
    """A parameter's gradient at `step` (or, for None, the parameter after the last step), put together from
    every rank's local shard in rank order."""
    pieces = [v["parameters"][name] if step is None else v["steps"][step]["grads"][name] for v in rank_values]
    assert all(type(p) is torch.Tensor for p in pieces), (
        f"{name}: a rank has no {'gradient' if step is not None else 'value'}"
    )
    return torch.cat(pieces)


@pytest.mark.parametrize("ranks", [2, 4])
def test_losses_gradients_and_parameters_equal_fsdp2s(submission: Submission, ranks: int) -> None:
    assert_no_library_fsdp(submission)
    seen, expected = returned(ours(submission, ranks, STEPS)), returned(fsdp2(ranks, STEPS))
    names = list(expected[0]["parameters"])
    for step in range(STEPS):
        loss = sum(float(v["steps"][step]["loss"]) for v in seen) / ranks
        reference = sum(float(v["steps"][step]["loss"]) for v in expected) / ranks
        assert loss == pytest.approx(reference, rel=1e-5, abs=1e-6), (
            f"{ranks} ranks, step {step + 1}: the loss is {loss:.7f}, FSDP2's {reference:.7f}"
        )
        norms = [
            torch.stack([whole(v, step, n).double().norm() for n in names]).norm() for v in (seen, expected)
        ]
        assert norms[0].item() == pytest.approx(norms[1].item(), rel=1e-5), (
            f"{ranks} ranks, step {step + 1}: the gradient norm is {norms[0]:.7f}, FSDP2's {norms[1]:.7f}"
        )
        for name in names:
            torch.testing.assert_close(whole(seen, step, name), whole(expected, step, name), rtol=1e-5, atol=1e-7,
                                       msg=f"{ranks} ranks, step {step + 1}: the gradient of {name}")  # fmt: skip
    for name in names:
        torch.testing.assert_close(whole(seen, None, name), whole(expected, None, name), rtol=1e-5, atol=1e-6,
                                   msg=f"{ranks} ranks: {name} after {STEPS} steps")  # fmt: skip


def assert_no_library_fsdp(submission: Submission) -> None:
    """The parity must come from the submission's own mechanism: no library FSDP named in its sources."""
    for path in FILES:
        scanned = scan_source(submission.source(path))
        names, texts = scanned.identifiers, scanned.imports | scanned.strings
        found = sorted(
            {b for b in BUILTINS if b in names}
            | {lib for lib in LIBRARIES if any(lib in t for t in texts | names)}
        )
        assert not found, (
            f"{path} uses {found}: write the sharding yourself, without a library's FSDP and without imports or "
            "code chosen at run time"
        )
