"""Dynamic batching: requests that arrive close together share one forward pass.

A CPU or GPU classifies a batch of 32 images in far less than 32 times the time of one, so under
load the server gathers what is waiting (up to `max_batch_size`) and runs it as one batch on a
single inference thread, while the event loop reads and decodes the next requests. It waits for
more (at most `timeout_s`) only while other requests are announced, being read or decoded, so a
lone request is never held back. The queue is bounded: past `max_pending` waiting items a
request is refused at once (503) rather than queued without end.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")


class Overloaded(Exception):
    """More requests are waiting than the server holds."""


class DynamicBatcher(Generic[Item, Result]):
    """`await submit(item)` -> `run_batch([..., item, ...])[i]`, with concurrent items batched.

    A request that will submit an item once it is decoded says so with `with batcher.coming():`
    around its reading and decoding, so the batcher knows to wait for it.

    `run_batch` maps a list of items to a list of results in the same order; it runs on one
    thread, one batch at a time. If it raises, every item of that batch gets the error. Use
    `async with` (inside the event loop that serves the requests) to start and stop it.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Item]], Sequence[Result]],
        max_batch_size: int,
        timeout_s: float,
        max_pending: int,
    ) -> None:
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.batch_sizes: Counter[int] = Counter()  # size -> batches run, for /metrics
        self._coming = 0

    async def __aenter__(self) -> DynamicBatcher[Item, Result]:
        self._queue: asyncio.Queue[tuple[Item, asyncio.Future[Result]]] = asyncio.Queue(
            self.max_pending
        )
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thaw-inference")
        self._task = asyncio.create_task(self._serve())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._executor.shutdown(wait=True)

    @property
    def waiting(self) -> int:
        """Items queued and not yet taken into a batch, for /metrics."""
        return self._queue.qsize()

    async def run_alone(self, function: Callable[[], Result]) -> Result:
        """`function()` on the inference thread, between batches: work that must not overlap a
        batch (Grad-CAM hooks the model it runs through)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function)

    @contextmanager
    def coming(self) -> Iterator[None]:
        """Announce an item that is being prepared for `submit`."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1

    async def submit(self, item: Item) -> Result:
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise Overloaded(f"{self.max_pending} requests are already waiting") from None
        return await future

    async def _next_batch(self) -> list[tuple[Item, asyncio.Future[Result]]]:
        """The first waiting item, then what else is waiting, and what is announced and comes
        within the timeout."""
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.timeout_s
        while len(batch) < self.max_batch_size:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0 or not self._coming:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except asyncio.TimeoutError:  # noqa: UP041 (Python 3.10's is not the builtin)
                break
        return batch

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            waiting = [(item, future) for item, future in batch if not future.cancelled()]
            if not waiting:
                continue
            items = [item for item, _ in waiting]
            self.batch_sizes[len(items)] += 1
            try:
                results = await loop.run_in_executor(self._executor, self.run_batch, items)
            except Exception as err:  # the batch's requests answer 500; the server goes on
                for _, future in waiting:
                    if not future.done():
                        future.set_exception(err)
                continue
            for (_, future), result in zip(waiting, results, strict=True):
                if not future.done():
                    future.set_result(result)
