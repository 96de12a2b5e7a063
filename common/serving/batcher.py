"""Dynamic batching: concurrent requests are queued to ONE inference worker that runs them in groups.

A model on a CPU or a GPU does far more work per second on a batch than on one input at a time: a batch-1
forward pass of a wide layer reads every weight from memory to do two FLOPs with it, a batch of 32 does 64.
A service receives inputs one request at a time, so it has to make the batches itself:

    batcher = DynamicBatcher(run_batch, BatchingConfig(max_batch_size=32, max_wait_ms=5))
    await batcher.start()
    output = await batcher.submit(input)        # from each request handler, concurrently
    await batcher.stop()                        # answers everything queued, then stops

The worker takes the first queued input, then keeps taking inputs until it has `max_batch_size` of them or
`max_wait_ms` has passed since it took the first: a lone request waits at most `max_wait_ms` longer than it
would unbatched, a burst fills a batch at once. `run_batch` runs in one worker thread (the event loop stays
free to accept and parse requests meanwhile) and returns one output per input, in order; each output goes
back to the future of the request that sent its input. `max_batch_size=1` is the unbatched baseline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from common.errors import EffdlError

__all__ = ["BatcherNotRunningError", "BatchingConfig", "DynamicBatcher", "QueueFullError"]

In = TypeVar("In")
Out = TypeVar("Out")


class BatcherNotRunningError(EffdlError, RuntimeError):
    """submit() before start() or after stop()."""


class QueueFullError(EffdlError, RuntimeError):
    """More requests are waiting than the queue admits: the service is overloaded (HTTP 503)."""


@dataclass(frozen=True)
class BatchingConfig:
    """How the worker groups requests."""

    max_batch_size: int = 32
    """Largest group one forward pass gets; 1 turns batching off (the baseline)."""
    max_wait_ms: float = 5.0
    """How long the worker waits for more requests after taking the first one of a batch."""
    max_queue: int = 4096
    """Requests allowed to wait; beyond it submit() raises QueueFullError instead of queueing without end."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1 (1 = no batching), got {self.max_batch_size}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {self.max_queue}")


_STOP = object()  # queued by stop(): everything before it is still answered


class DynamicBatcher(Generic[In, Out]):
    """Groups concurrent submit() calls into calls of `run_batch(inputs) -> outputs` on one worker thread.

    on_batch(n) is called on the event loop after each batch (e.g. to observe a batch-size histogram);
    on_queue_depth(n) whenever the number of waiting requests changes (e.g. to set a gauge); waiting means
    submitted and not yet in a running forward pass, so the batch being formed counts.
    """

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out]],
        config: BatchingConfig | None = None,
        *,
        on_batch: Callable[[int], None] | None = None,
        on_queue_depth: Callable[[int], None] | None = None,
    ) -> None:
        self.run_batch = run_batch
        self.config = config or BatchingConfig()
        self._on_batch = on_batch or (lambda n: None)
        self._on_queue_depth = on_queue_depth or (lambda n: None)
        self._queue: asyncio.Queue | None = None
        self._worker: asyncio.Task | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._accepting = False
        self._waiting = (
            0  # submitted, not yet in a running forward pass (queued or in the batch being formed)
        )

    @property
    def running(self) -> bool:
        """Whether submit() is accepted: started, not stopping, and the worker is alive."""
        return self._accepting and self._worker is not None and not self._worker.done()

    async def start(self) -> None:
        """Start the worker task and its thread on the running event loop."""
        if self._worker is not None:
            raise BatcherNotRunningError("start() was called twice; a batcher runs once")
        self._queue = asyncio.Queue()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._worker = asyncio.create_task(self._work(), name="batcher")
        self._accepting = True

    async def submit(self, item: In) -> Out:
        """Queue one input and wait for its output (or the exception its batch raised)."""
        if not self.running or self._queue is None:
            raise BatcherNotRunningError("the batcher is not running (not started yet, or stopping)")
        if self._waiting >= self.config.max_queue:
            raise QueueFullError(
                f"{self._waiting} requests are already waiting (max_queue={self.config.max_queue}); retry later"
            )
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        self._waiting += 1
        self._on_queue_depth(self._waiting)
        return await future

    async def stop(self) -> None:
        """Refuse new inputs, answer every queued one, then stop the worker and its thread."""
        if self._worker is None or self._queue is None:
            return
        self._accepting = False
        self._queue.put_nowait(_STOP)
        await self._worker
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    async def _next_batch(self) -> tuple[list[tuple[In, asyncio.Future]], bool]:
        """(batch, stop): the first queued input, then more until the batch is full or the wait is over."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        first = await self._queue.get()
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = loop.time() + self.config.max_wait_ms / 1000
        while len(batch) < self.config.max_batch_size:
            if self._queue.empty():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    entry = await asyncio.wait_for(self._queue.get(), remaining)
                except TimeoutError:
                    break
            else:
                entry = self._queue.get_nowait()  # already waiting: no reason to wait for it
            if entry is _STOP:
                return batch, True
            batch.append(entry)
        return batch, False

    async def _work(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        stop = False
        while not stop:
            batch, stop = await self._next_batch()
            self._waiting -= len(batch)  # these leave the wait: their forward pass starts now
            self._on_queue_depth(self._waiting)
            batch = [(item, future) for item, future in batch if not future.cancelled()]  # caller gave up
            if not batch:
                continue
            inputs = [item for item, _ in batch]
            try:
                outputs = await loop.run_in_executor(self._executor, self.run_batch, inputs)
                if len(outputs) != len(inputs):
                    raise RuntimeError(
                        f"run_batch returned {len(outputs)} outputs for {len(inputs)} inputs; "
                        "it must return one output per input, in order"
                    )
            except Exception as error:  # the batch failed: every request in it gets the error
                for _, future in batch:
                    if not future.done():
                        future.set_exception(error)
            else:
                for (_, future), output in zip(batch, outputs, strict=True):
                    if not future.done():
                        future.set_result(output)
            self._on_batch(len(inputs))
