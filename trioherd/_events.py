"""Worker events a Trio program can observe from the primary (the Node cluster events).

:class:`EventHub` fans every :class:`HerdEvent` out to its subscribers, each with a
bounded buffer: a reader that falls behind misses the newest events, never blocks the herd.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio

EVENT_BUFFER = 1000


@attrs.frozen
class HerdEvent:
    """Something that happened to a worker: ``kind`` is one of online, ready, message,
    disconnect, exit (the Node cluster events)."""

    kind: str
    worker_id: int
    pid: int
    slot: int
    data: Any = None
    exit_code: int | None = None
    signal: str | None = None
    requested: bool = False
    """For ``exit``: the worker exited after a disconnect the primary asked for."""


class EventHub:
    def __init__(self) -> None:
        self._subscribers: list[trio.MemorySendChannel[HerdEvent]] = []

    def subscribe(self, kind: str | None = None) -> AsyncIterator[HerdEvent]:
        """Every event (of ``kind``, if given) from this call on."""
        send, receive = trio.open_memory_channel[HerdEvent](EVENT_BUFFER)
        self._subscribers.append(send)
        return _EventStream(receive, lambda: self._unsubscribe(send), kind)

    def publish(self, event: HerdEvent) -> None:
        for channel in list(self._subscribers):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._unsubscribe(channel)

    def close(self) -> None:
        """End every subscriber's stream."""
        for channel in list(self._subscribers):
            self._unsubscribe(channel)

    def _unsubscribe(self, channel: trio.MemorySendChannel[HerdEvent]) -> None:
        if channel in self._subscribers:
            self._subscribers.remove(channel)
            channel.close()


class _EventStream:
    def __init__(
        self,
        receive: trio.MemoryReceiveChannel[HerdEvent],
        close: Callable[[], None],
        kind: str | None,
    ) -> None:
        self._receive = receive
        self._close = close
        self._kind = kind

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> HerdEvent:
        while True:
            try:
                event = await self._receive.receive()
            except (trio.EndOfChannel, trio.ClosedResourceError):
                raise StopAsyncIteration from None
            if self._kind is None or event.kind == self._kind:
                return event

    async def aclose(self) -> None:
        self._close()
        await self._receive.aclose()
