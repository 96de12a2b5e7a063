"""Make `largemodels` importable from this assignment's src/ folder, and run test functions on ranks.

The ranks run on the grader's own process group (the hub of `common.grading.ranks`), as in the hidden tests:
gloo has no `all_to_all` with tensor lists, and the hub logs every collective. They are forked from a process
started here, before any test runs: a rank forked after this process ran a backward pass on a machine with a
GPU could not run autograd.
"""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from common.grading.ranks import RankRun, run_ranks, start_zygote  # noqa: E402


def on_hub(fn: Callable[..., Any], nprocs: int, *args: Any, module: str) -> dict[int, Any]:
    """Run fn(*args) on nprocs ranks of the grader's process group; {rank: what fn returned}.

    fn must be a function of a test module, and import the submission's module (`module`, which must not be
    imported into this process) inside. A rank's NotImplementedError (the starter's stubs) is raised as such.
    """
    ran = RankRun.from_data(run_ranks(fn, [args] * nprocs, package=module, timeout_s=60))
    for error in ran.errors:
        if error is not None and error["name"] == "NotImplementedError":
            raise NotImplementedError(error["line"])
    problem = ran.failure()
    if problem is not None:
        raise AssertionError(problem)
    return dict(enumerate(ran.values))


start_zygote()  # last: a rank imports its test module, which imports this one, from the zygote's copy
