"""Make `dataparallel` importable from this assignment's src/ folder, and run test functions on gloo ranks."""

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[2] / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))

from common.distributed.launch import RankError, launch  # noqa: E402


def on_ranks(fn: Callable[..., Any], nprocs: int, *args: Any) -> dict[int, Any]:
    """`launch(fn, nprocs)` on gloo; a rank's NotImplementedError (the starter's stubs) is raised as such."""
    try:
        return launch(fn, nprocs, args=args, backend="gloo", timeout_s=60)
    except RankError as error:
        last = error.details.strip().splitlines()[-1]
        if last.startswith("NotImplementedError"):
            raise NotImplementedError(last.partition(": ")[2]) from None
        raise
