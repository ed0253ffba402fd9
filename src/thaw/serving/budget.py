"""The server-wide budget of decoded pixels in flight, so that parallel uploads cannot grow
memory without bound: a decode starts only once its pixels fit under `capacity`, waiting in
arrival order (a large image is not starved by a stream of small ones) for at most `wait_s`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class BudgetExhausted(Exception):
    """No budget freed up within the wait: the server is decoding as much as it holds."""


class PixelBudget:
    def __init__(self, capacity: int, wait_s: float) -> None:
        self.capacity, self.wait_s = capacity, wait_s
        self.in_flight = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()

    @asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Hold `pixels` of the budget for the block; BudgetExhausted if they are not free
        within `wait_s`. `pixels` must not exceed the capacity (max_image_pixels sees to it)."""
        await self._acquire(pixels)
        try:
            yield
        finally:
            self.in_flight -= pixels
            self._grant()

    async def _acquire(self, pixels: int) -> None:
        if not self._waiting and self.in_flight + pixels <= self.capacity:
            self.in_flight += pixels
            return
        granted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, granted)
        self._waiting.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(granted), self.wait_s)
        except BaseException as err:  # timed out, or the request was cancelled
            if granted.done():  # granted at the last moment: give it back
                self.in_flight -= pixels
            else:
                granted.cancel()
                self._waiting.remove(entry)
            self._grant()
            if isinstance(err, asyncio.TimeoutError):
                raise BudgetExhausted(
                    f"{self.in_flight:,} decoded pixels are in flight, the most the server "
                    f"holds is {self.capacity:,} (max_pixels_in_flight)"
                ) from None
            raise

    def _grant(self) -> None:
        """Let in the waiting requests, first come first, while the first one fits."""
        while self._waiting and self.in_flight + self._waiting[0][0] <= self.capacity:
            pixels, granted = self._waiting.popleft()
            self.in_flight += pixels
            granted.set_result(None)
