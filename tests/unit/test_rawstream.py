"""The worker's edge-triggered wait for the next request (``protocols.rawstream.EdgeWaiter``), in
process over real socket pairs: it wakes a reader when data comes, remembers data that
came while nobody waited, lets a cancelled wait go, and never leaves unread data waiting
for an edge that will not come. And ``RawSocketStream.send_all``: the answers of one pass
leave together, and its yield does not give up a send."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from trioherd.protocols.rawstream import RECEIVE_SIZE, EdgeWaiter, RawSocketStream

pytestmark = pytest.mark.trio


@asynccontextmanager
async def edge_stream() -> AsyncIterator[tuple[RawSocketStream, socket.socket, EdgeWaiter]]:
    ours, theirs = socket.socketpair()
    waiter = EdgeWaiter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter.run)
        stream = RawSocketStream(ours, waiter=waiter)
        try:
            yield stream, theirs, waiter
        finally:
            stream.close()
            theirs.close()
            nursery.cancel_scope.cancel()


async def test_a_waiting_reader_wakes_when_data_comes() -> None:
    async with edge_stream() as (stream, peer, _):
        got: list[bytes] = []

        async def read() -> None:
            got.append(await stream.receive_next())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []  # nothing yet: it waits
            peer.send(b"GET / HTTP/1.1\r\n\r\n")
        assert got == [b"GET / HTTP/1.1\r\n\r\n"]


async def test_data_that_came_while_nobody_waited_is_read_at_once() -> None:
    async with edge_stream() as (stream, peer, _):
        peer.send(b"first")
        with trio.fail_after(5):
            assert await stream.receive_next() == b"first"  # registered with data there
            peer.send(b"second")
            await trio.testing.wait_all_tasks_blocked()  # the event comes, nobody waits
            assert await stream.receive_next() == b"second"


async def test_a_cancelled_wait_lets_go_and_the_next_wait_still_works(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with edge_stream() as (stream, peer, _):
        with trio.move_on_after(0.05) as scope:
            await stream.receive_next()
        assert scope.cancelled_caught
        peer.send(b"later")
        with trio.fail_after(5):
            assert await stream.receive_next() == b"later"


async def test_a_full_buffer_is_not_left_waiting_for_an_edge() -> None:
    """More than one receive's worth arrives at once: the second receive must not wait
    for new data (edge-triggered, no new event would come)."""
    async with edge_stream() as (stream, peer, _):
        peer.setblocking(False)
        sent = 0
        while sent < RECEIVE_SIZE + 1000:
            try:
                sent += peer.send(b"x" * 8192)
            except BlockingIOError:
                break
        assert sent > RECEIVE_SIZE
        received = 0
        with trio.fail_after(5):
            while received < sent:
                received += len(await stream.receive_next())
        assert received == sent


async def test_closing_wakes_a_waiting_reader_with_closed_resource_error() -> None:
    async with edge_stream() as (stream, _, waiter):
        errors: list[Exception] = []

        async def read() -> None:
            try:
                await stream.receive_next()
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            stream.close()
        assert len(errors) == 1
        assert not waiter._waiting and not waiter._ready


@pytest.mark.parametrize("how", ["receive_some", "lent socket"])
async def test_closing_wakes_a_reader_waiting_in_trios_own_wait(how: str) -> None:
    # close() tells trio only when a task may wait on the socket there (notify_closing
    # costs a failing epoll_ctl on every connection otherwise): such a wait must still end
    async with edge_stream() as (stream, _, _waiter):
        errors: list[Exception] = []

        async def read() -> None:
            try:
                if how == "receive_some":
                    await stream.receive_some()
                else:  # the WebSocket's reader waits on the raw socket itself
                    await trio.lowlevel.wait_readable(stream.lend_socket())
            except trio.ClosedResourceError as exc:
                errors.append(exc)

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                stream.close()
        assert len(errors) == 1


async def test_the_answers_of_one_pass_leave_together() -> None:
    """Connections woken in the same pass of the run loop all make their answers before
    any of them is written: a client then wakes once for the lot (``send_all`` yields
    before it writes, see the module docstring)."""
    pairs = [socket.socketpair() for _ in range(3)]
    streams = [RawSocketStream(ours) for ours, _ in pairs]
    log: list[tuple[str, int]] = []

    async def answer(i: int) -> None:
        log.append(("made", i))
        await streams[i].send_all(b"answer %d" % i)
        log.append(("sent", i))

    try:
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(answer, i)  # all three run in the same pass
        kinds = [kind for kind, _ in log]
        assert kinds == ["made"] * 3 + ["sent"] * 3, log
        for i, (_, theirs) in enumerate(pairs):
            assert theirs.recv(100) == b"answer %d" % i  # and nothing was lost
    finally:
        for stream in streams:
            stream.close()
        for _, theirs in pairs:
            theirs.close()


async def test_the_last_answer_leaves_at_once() -> None:
    # send_final (the connection closes after it) does not wait for the pass to end
    async with edge_stream() as (stream, theirs, _):
        ran: list[str] = []

        async def other() -> None:
            ran.append("other")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other)  # runs at this task's next checkpoint
            await stream.send_final(b"bye")
            assert theirs.recv(10) == b"bye"
            assert ran == []  # no checkpoint came between: the answer left first


async def test_a_cancelled_scope_does_not_stop_a_send_that_need_not_wait() -> None:
    """The yield before a write is shielded: an answer that fits the socket's buffer
    goes out even if the connection's scope was cancelled meanwhile (the send timeout,
    not the yield, decides when a send is given up)."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)  # what was sent is there at once, or it was not sent
    stream = RawSocketStream(ours)
    try:
        with trio.CancelScope() as scope:
            scope.cancel()
            await stream.send_all(b"complete")
        assert theirs.recv(100) == b"complete"
    finally:
        stream.close()
        theirs.close()


# -- send_soon: an answer handed to the worker's flusher ----------------------------------


async def test_an_answer_handed_over_is_written_by_the_flusher() -> None:
    async with edge_stream() as (stream, peer, _):
        peer.setblocking(False)
        assert stream.send_soon(b"answer")
        assert stream.pending  # not yet: in the next pass
        await trio.testing.wait_all_tasks_blocked()
        assert peer.recv(100) == b"answer"
        assert not stream.pending


async def test_what_comes_after_a_handed_over_answer_follows_it() -> None:
    """A pipelined request's answer, sent before the flusher ran, goes after the first."""
    async with edge_stream() as (stream, peer, _):
        assert stream.send_soon(b"first ")
        assert not stream.send_soon(b"no: one at a time")
        await stream.send_all(b"second")
        await trio.testing.wait_all_tasks_blocked()
        peer.setblocking(False)
        assert peer.recv(100) == b"first second"


async def test_an_answer_the_flusher_cannot_finish_is_finished_by_its_task() -> None:
    """The client reads slowly: the flusher writes what fits, the connection's task
    (waiting for the next request) writes the rest, in order, and then reads on."""
    async with edge_stream() as (stream, peer, _):
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        answer = bytes(range(256)) * 64  # 16 KiB: more than the buffers hold
        assert stream.send_soon(answer)
        got = bytearray()

        async def slow_client() -> None:
            await trio.sleep(0.05)  # the flusher has written what fit
            while len(got) < len(answer):
                await trio.lowlevel.wait_readable(peer)
                got.extend(peer.recv(1000))
            peer.send(b"next request")

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(slow_client)
                assert await stream.receive_next() == b"next request"
        assert bytes(got) == answer


async def test_an_error_the_flusher_met_is_the_tasks_to_see() -> None:
    async with edge_stream() as (stream, peer, _):
        peer.close()  # the client is gone: the write fails
        assert stream.send_soon(b"answer")
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(5), pytest.raises(trio.BrokenResourceError):
            await stream.receive_next()


async def test_a_close_writes_the_answer_handed_over_first() -> None:
    ours, theirs = socket.socketpair()
    waiter = EdgeWaiter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter.run)
        await trio.testing.wait_all_tasks_blocked()
        stream = RawSocketStream(ours, waiter=waiter)
        assert stream.send_soon(b"last answer")
        await stream.flush_pending()  # what the HTTP connection's close does
        stream.close()
        theirs.setblocking(False)
        assert theirs.recv(100) == b"last answer"
        theirs.close()
        nursery.cancel_scope.cancel()


async def test_an_interrupted_wait_ends_and_after_resume_the_socket_serves_again() -> None:
    """A deadline ends the task's wait through trio's notify_closing on a socket that stays
    open (``interrupt``); after ``resume`` the same stream reads and writes again, with
    trio's own wait too: notify_closing only drops trio's registration of the fd, and the
    next wait registers it anew (the late 408 is sent this way)."""
    ours, peer = socket.socketpair()
    stream = RawSocketStream(ours)
    try:
        errors: list[type[BaseException]] = []

        async def read() -> None:
            try:
                await stream.receive_some(RECEIVE_SIZE)
            except trio.ClosedResourceError as exc:
                errors.append(type(exc))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await trio.testing.wait_all_tasks_blocked()
            assert stream.interrupt()  # the task was waiting: its wait ends
        assert errors == [trio.ClosedResourceError]
        stream.resume()
        await stream.send_all(b"408 after all")
        assert peer.recv(100) == b"408 after all"
        peer.send(b"more")
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(ours)  # trio registers the fd anew
            assert await stream.receive_some(RECEIVE_SIZE) == b"more"
        assert not stream.interrupt()  # nobody waits now: nothing to end
    finally:
        stream.close()
        peer.close()
