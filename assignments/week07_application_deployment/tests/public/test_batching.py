"""Public tests of `modelserver.batching.Batcher`, on a toy run_batch that records the batches it gets."""

from __future__ import annotations

import asyncio

from modelserver.batching import Batcher


async def _send(
    count: int, max_batch: int, max_wait_ms: float
) -> tuple[list[int], list[list[int]], list[int]]:
    """Submit 0..count-1 at once; (outputs, the batches run_batch saw, the sizes on_batch saw)."""
    seen: list[list[int]] = []
    observed: list[int] = []

    def run_batch(items: list[int]) -> list[int]:
        seen.append(list(items))
        return [10 * item for item in items]

    batcher = Batcher(run_batch, max_batch, max_wait_ms, on_batch=observed.append)
    await batcher.start()
    outputs = await asyncio.gather(*(batcher.submit(i) for i in range(count)))
    await batcher.stop()
    return list(outputs), seen, observed


def test_concurrent_submits_share_batches_and_get_their_own_outputs() -> None:
    outputs, seen, observed = asyncio.run(_send(10, max_batch=4, max_wait_ms=50))
    assert outputs == [10 * i for i in range(10)], "each submit must get the output of its own input"
    assert sorted(i for batch in seen for i in batch) == list(range(10)), "every input runs exactly once"
    assert max(len(batch) for batch in seen) == 4, "10 inputs sent at once fill batches of max_batch_size=4"
    assert observed == [len(batch) for batch in seen], "on_batch is called with each batch's size"


def test_max_batch_size_one_runs_one_at_a_time() -> None:
    outputs, seen, _ = asyncio.run(_send(5, max_batch=1, max_wait_ms=50))
    assert outputs == [0, 10, 20, 30, 40] and [len(batch) for batch in seen] == [1] * 5


def test_an_error_in_run_batch_reaches_the_requests_of_that_batch() -> None:
    async def scenario() -> tuple[BaseException | int, ...]:
        def run_batch(items: list[int]) -> list[int]:
            if 3 in items:
                raise ValueError("bad input 3")
            return items

        batcher = Batcher(run_batch, 1, 0)
        await batcher.start()
        results = await asyncio.gather(*(batcher.submit(i) for i in range(5)), return_exceptions=True)
        await batcher.stop()
        return tuple(results)

    results = asyncio.run(scenario())
    assert [r for i, r in enumerate(results) if i != 3] == [0, 1, 2, 4], "the other batches are answered"
    assert isinstance(results[3], ValueError), "the failing batch's request gets run_batch's error"
