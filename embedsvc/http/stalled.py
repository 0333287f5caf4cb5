"""Answers a client does not read: the write timeout of a connection whose writes are
paused, and the process-wide budget of unsent bytes over all such connections
(--write-timeout, --max-unsent-bytes). A layer of embedsvc's HTTP protocol
(http/protocol.py), over uvicorn's pause_writing callback."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from embedsvc.http.limits import ConnectionLimits
from embedsvc.http.one_write import OneWriteHttpProtocol

# Connections whose writes are paused (the client is not reading), oldest first, with the
# loop time they stalled: the process's unsent answers are theirs (write buffers of the
# others are under the transport's high-water mark).
STALLED: dict[StalledWrites, float] = {}


class StalledWrites(OneWriteHttpProtocol):
    """uvicorn's protocol with one write per response, and the bounds (see the module) on
    what answers a client does not read may hold; every close it makes is counted through
    the app's `on_connection_closed(reason)`."""

    limits = ConnectionLimits()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._on_closed: Callable[[str], None] | None = getattr(
            self.config.app, "on_connection_closed", None
        )
        self._write_timer: asyncio.TimerHandle | None = None
        self._unsent_mark = 0  # bytes unsent when the write timer was armed

    def _closed_for(self, reason: str) -> None:
        if self._on_closed is not None:
            self._on_closed(reason)

    def pause_writing(self) -> None:
        """The transport holds more than its high-water mark of answers for this client:
        its write clock starts, and the process's budget of unsent bytes is checked."""
        super().pause_writing()
        if self in STALLED:
            return
        STALLED[self] = self.loop.time()
        self._unsent_mark = self.transport.get_write_buffer_size()
        self._write_timer = self.loop.call_later(self.limits.write_timeout, self._write_due)
        self._check_unsent()

    def _write_due(self) -> None:
        """Close the connection if its client has read nothing for write_timeout seconds;
        reading some of what is held starts the clock again."""
        self._write_timer = None
        if self not in STALLED or self.transport.is_closing():
            return
        unsent = self.transport.get_write_buffer_size()
        if unsent < self._unsent_mark:
            self._unsent_mark = unsent
            self._write_timer = self.loop.call_later(self.limits.write_timeout, self._write_due)
            return
        self.logger.info(
            "closing a connection whose client read nothing of %d bytes for %g s",
            unsent,
            self.limits.write_timeout,
        )
        self._drop("write_timeout")

    def _check_unsent(self) -> None:
        """Past max_unsent_bytes of answers held for clients that do not read, the
        connections that stalled first are closed (their answers dropped) until the rest
        fit: the memory held for slow readers is bounded whatever their number."""
        budget = self.limits.max_unsent_bytes
        sizes = {p: p.transport.get_write_buffer_size() for p in STALLED}
        total = sum(sizes.values())
        for p in list(STALLED):
            if total <= budget:
                return
            total -= sizes[p]
            p.logger.warning(
                "closing a connection holding %d unsent bytes: answers held for clients "
                "that do not read passed max_unsent_bytes (%d)",
                sizes[p],
                budget,
            )
            p._drop("unsent_budget")

    def _drop(self, reason: str) -> None:
        self._closed_for(reason)
        self._unstall()
        self.transport.abort()  # what it holds is freed now, not after a last write

    def _unstall(self) -> None:
        STALLED.pop(self, None)
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
