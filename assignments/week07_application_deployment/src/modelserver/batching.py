"""Dynamic batching: concurrent requests grouped into one forward pass each (you write this).

A model does far more work per second on a batch than on one input at a time, but a service receives its
inputs one request at a time: it has to make the batches itself. Every request handler calls

    prediction = await batcher.submit(pixels)

and waits; one worker task takes the first waiting input, keeps taking inputs until it holds
`max_batch_size` of them or `max_wait_ms` has passed since it took the first, then runs `run_batch` on the
group *in a thread* (the event loop must stay free to accept and parse the next requests meanwhile) and
hands each output back to the request that sent its input. A lone request waits at most `max_wait_ms`
longer than it would unbatched; a burst fills a batch at once. `max_batch_size=1` is the unbatched baseline.

Write it with asyncio alone (a queue, futures, `asyncio.to_thread`): the grader reads this file and refuses
a batcher imported from the course library.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["Batcher"]

In = TypeVar("In")
Out = TypeVar("Out")

POLL_S = 0.001  # how often the worker looks for more inputs while it waits to fill a batch


class Batcher(Generic[In, Out]):
    """Groups concurrent `submit` calls into calls of `run_batch(inputs) -> outputs` (one output per input,
    in order) on one worker, as the module doc describes; `on_batch(n)` is called after each batch of n."""

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        max_batch_size: int,
        max_wait_ms: float,
        on_batch: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (1 = no batching), got {max_batch_size}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_ms = max_wait_ms
        self.on_batch = on_batch or (lambda size: None)
        self._queue: asyncio.Queue[tuple[In, asyncio.Future[Out]] | None] | None = None
        self._worker: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        """Whether submit() is answered: after start(), before stop()."""
        return self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the worker task on the running event loop."""
        # BEGIN SOLUTION: Batcher.start: make the queue and start the worker task
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._work())
        # END SOLUTION

    async def submit(self, item: In) -> Out:
        """Queue one input and wait for its own output; RuntimeError if the batcher is not running."""
        # BEGIN SOLUTION: Batcher.submit: queue the input with a future of its own and wait for that future
        if not self.running or self._queue is None:
            raise RuntimeError("the batcher is not running: call start() first")
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future
        # END SOLUTION

    async def stop(self) -> None:
        """Answer every input queued so far, then stop the worker."""
        # BEGIN SOLUTION: Batcher.stop: queue a stop marker behind the waiting inputs and wait for the worker
        if self.running and self._queue is not None and self._worker is not None:
            self._queue.put_nowait(None)
            await self._worker
        # END SOLUTION

    async def _work(self) -> None:
        """The worker: take a batch, run it, answer it; until stop()."""
        # BEGIN SOLUTION: Batcher._work: take the first input, more until the batch is full or max_wait_ms has passed, then answer the batch
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        stopping = False
        while not stopping:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = loop.time() + self.max_wait_ms / 1000
            # Polled rather than `wait_for(queue.get())`: on Python 3.11 a get cancelled at its timeout can
            # lose the item it had just taken.
            while len(batch) < self.max_batch_size and loop.time() < deadline:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    await asyncio.sleep(POLL_S)
                    continue
                if item is None:
                    stopping = True
                    break
                batch.append(item)
            await self._answer(batch)
        # END SOLUTION

    async def _answer(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        """Run one batch in a thread and give each future its own output (or the batch's error)."""
        # BEGIN SOLUTION: Batcher._answer: run_batch in a thread, each output to its own future, then on_batch
        try:
            outputs = list(await asyncio.to_thread(self.run_batch, [item for item, _ in batch]))
            if len(outputs) != len(batch):
                raise RuntimeError(f"run_batch returned {len(outputs)} outputs for {len(batch)} inputs")
        except Exception as error:  # every waiting request learns of it; the worker goes on
            waiting = [future for _, future in batch if not future.done()]
            for future in waiting:
                future.set_exception(error)
            return
        for (_, future), output in zip(batch, outputs, strict=True):
            if not future.done():  # its request may have been cancelled (the client went away)
                future.set_result(output)
        self.on_batch(len(batch))
        # END SOLUTION
