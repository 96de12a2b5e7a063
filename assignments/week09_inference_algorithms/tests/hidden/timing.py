"""Wall-clock timing from the checker's side: of the submission's calls and of the baseline, the same way.

The submission's code runs in its worker, another process, so the checker cannot put CUDA events on its
stream; what the checker can measure, and the submission cannot forge, is how long a call takes to come back.
A call has a fixed cost (the request, the reply, the scenario's synchronize) besides the work, so each side
runs `reps` and `2 * reps` repetitions and the difference, divided by reps, is the work alone. The baseline
(cuBLAS, plain decoding) runs in this process on the same GPU, measured the same way, alternating with the
submission so that clocks and temperature drift alike on both; the median ratio of the trials is the score.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def seconds_per_repetition(run: Callable[[int], object], reps: int) -> float:
    """(t(run(2 reps)) - t(run(reps))) / reps: one repetition's wall time, the fixed cost of a call cancelled.
    `run` must synchronize the GPU before it returns."""
    start = time.perf_counter()
    run(reps)
    middle = time.perf_counter()
    run(2 * reps)
    end = time.perf_counter()
    return max((end - middle) - (middle - start), 1e-9) / reps


def median_speedup(ours: Callable[[int], object], baseline: Callable[[int], object], reps: int,
                   trials: int = 5) -> float:  # fmt: skip
    """The median over `trials` of baseline time / our time, the two measured alternately."""
    ratios = []
    for _ in range(trials):
        theirs = seconds_per_repetition(baseline, reps)
        ratios.append(theirs / seconds_per_repetition(ours, reps))
    return statistics.median(ratios)
