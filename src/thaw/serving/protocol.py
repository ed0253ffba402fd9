"""uvicorn's h11 protocol with a deadline for each request head, against slow-loris clients.

uvicorn times out an idle keep-alive connection, but not one that has sent part of a request
head: a client that sends half a header and stalls holds its connection (and a place under
`limit_concurrency`) for ever. Here a connection must deliver each complete request head within
`header_timeout_s` of opening, or of the previous response, or it is closed. The body has its
own deadline, in the routes that read one (routes.read_body: 408).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle


class HeadDeadlineProtocol(H11Protocol):
    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._await_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_head()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        super().connection_lost(exc)

    def _await_head(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
        if not self.transport.is_closing():
            self._head_deadline = self.loop.call_later(
                self.header_timeout_s, self._head_late, self.cycle
            )

    def _head_late(self, cycle: RequestResponseCycle | None) -> None:
        """Close the connection if no request head came since `cycle` (a pipelined request
        that came meanwhile is answered: it has its own cycle)."""
        waiting = self.cycle is cycle and (cycle is None or cycle.response_complete)
        if waiting and not self.transport.is_closing():
            self.transport.close()
