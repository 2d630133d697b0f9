"""Worker events a Trio program can observe from the primary (the Node cluster events).

:class:`EventHub` fans every :class:`HerdEvent` out to its subscribers, each with a
bounded buffer: a reader that falls behind misses the newest events, never blocks the herd.

A worker's *message* (``send_to_primary``) that no subscriber wanted when it came is not
lost: it waits in a backlog (the newest 1000) for the first subscriber that wants it. So
``herd.messages()``, subscribed once ``nursery.start(trioherd.serve, ...)`` has returned,
still yields what the workers sent while they booted. Lifecycle events (online, ready,
disconnect, exit) are news: a subscriber gets those from its call on only.
"""

from __future__ import annotations

import collections
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


@attrs.define(eq=False)
class _Subscriber:
    channel: trio.MemorySendChannel[HerdEvent]
    kind: str | None

    def wants(self, event: HerdEvent) -> bool:
        return self.kind is None or event.kind == self.kind


class EventHub:
    def __init__(self) -> None:
        self._subscribers: list[_Subscriber] = []
        self._backlog: collections.deque[HerdEvent] = collections.deque(maxlen=EVENT_BUFFER)
        self._observers: list[Callable[[HerdEvent], None]] = []
        self._closed = False

    def subscribe(self, kind: str | None = None) -> AsyncIterator[HerdEvent]:
        """The messages (if ``kind`` lets them through) waiting in the backlog, then every
        event (of ``kind``, if given) from this call on. Once the hub is closed, the
        stream ends after the backlog."""
        send, receive = trio.open_memory_channel[HerdEvent](EVENT_BUFFER)
        subscriber = _Subscriber(send, kind)
        kept: collections.deque[HerdEvent] = collections.deque(maxlen=EVENT_BUFFER)
        for event in self._backlog:
            if subscriber.wants(event):
                send.send_nowait(event)  # the backlog is no longer than the buffer
            else:
                kept.append(event)
        self._backlog = kept
        if self._closed:
            send.close()
        else:
            self._subscribers.append(subscriber)
        return _EventStream(receive, lambda: self._unsubscribe(subscriber))

    def observe(self, callback: Callable[[HerdEvent], None]) -> None:
        """Call ``callback(event)`` for every event from now on (synchronously; it must not
        block). An observer takes nothing from the backlog and leaves every event there
        for the subscribers."""
        self._observers.append(callback)

    def publish(self, event: HerdEvent) -> None:
        for observer in self._observers:
            observer(event)
        taken = False
        for subscriber in list(self._subscribers):
            if not subscriber.wants(event):
                continue
            try:
                subscriber.channel.send_nowait(event)
                taken = True
            except trio.WouldBlock:
                taken = True  # a subscriber that wants it but falls behind misses it
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._unsubscribe(subscriber)
        if not taken and event.kind == "message":
            self._backlog.append(event)

    def close(self) -> None:
        """End every subscriber's stream (a later subscriber gets the backlog, then the
        end)."""
        self._closed = True
        for subscriber in list(self._subscribers):
            self._unsubscribe(subscriber)

    def _unsubscribe(self, subscriber: _Subscriber) -> None:
        if subscriber in self._subscribers:
            self._subscribers.remove(subscriber)
            subscriber.channel.close()


class _EventStream:
    def __init__(
        self, receive: trio.MemoryReceiveChannel[HerdEvent], close: Callable[[], None]
    ) -> None:
        self._receive = receive
        self._close = close

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> HerdEvent:
        try:
            return await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self._close()
        await self._receive.aclose()
