"""A trio stream over a plain non-blocking socket, for the HTTP hot path.

trio's SocketStream yields to the scheduler around every call, even when the kernel could
answer at once; on a keep-alive connection that is several scheduling rounds per request.
This stream tries the system call first and waits (``wait_readable``/``wait_writable``)
only when the kernel says EAGAIN.

Fairness: a receive that found data at once still yields once (a trip to the back of the
run queue), so a client that always has its next request ready cannot starve the other
connections. The stream's first receive does not yield: the connection's task has just
come through the run queue when it was started.

Sends yield *before* they write, once per ``send_all``: every connection woken in one
pass of the run loop reads and answers its request, then all the answers go out together
in the next pass, a few microseconds apart, instead of one per request's work. A client
(wrk, a proxy on the same machine) then wakes once for the lot instead of once per
response; waking a sleeping reader is the sender's cost, and the costliest part of a small
send on a virtual machine. The response is held back by at most the pass it was made in.

A small answer on a connection that goes on need not even be written by its task:
:meth:`RawSocketStream.send_soon` hands it to the :class:`EdgeWaiter`'s flusher, which
writes the answers handed over in a pass all together in the next, and the task goes
straight back to waiting for its next request (one trip through trio's scheduler less per
request). What the flusher cannot write at once stays with the stream, and its task
finishes it before anything else (with the send timeout of any stalled send); an error
the flusher met is raised by the stream's next call.

What each of these choices measured (the yield's p99 against starvation, wake-ups per
response, CPU per request) is in docs/performance.md ("Where the time goes, and what we
did about it" and "What changed, and what each change measured"), where figures are kept
with the run that produced them.

The next request of a keep-alive connection (``receive_next``) is waited for on the
worker's :class:`EdgeWaiter`, an epoll of its own where each socket is registered once,
instead of trio's ``wait_readable``, which re-arms a one-shot registration every time.

Send timeout: a send that has to wait tells its :class:`SendWatch` (the HTTP connection)
when it stalls, again after each stall that follows progress, and when it is done; the
connection's deadline sweeper does the rest. A send that never waits costs nothing more.

Deadlines end a wait through :meth:`RawSocketStream.interrupt` (the sweeper's call), not a
cancel scope per connection: the interrupted wait, and any after it, raises
ClosedResourceError.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
from collections.abc import Awaitable
from typing import Any

import trio

from .shared import RECEIVE_SIZE, SendWatch

__all__ = ["RECEIVE_SIZE", "EdgeWaiter", "RawSocketStream", "SendWatch", "TrioWaits"]

_CLOSED_ERRNOS = (errno.EBADF, errno.ENOTSOCK)


class EdgeWaiter:
    """Waits for the next request of keep-alive connections on an epoll of the worker's own.

    trio's ``wait_readable`` re-arms a one-shot epoll registration on every wait: one
    ``epoll_ctl`` per request, and trio's bookkeeping around it. Here a connection's socket
    is registered once, edge-triggered, and one task (:meth:`run`) turns the epoll's
    events into wake-ups through ``trio.lowlevel``; an event for a connection that is not
    waiting is kept (``_ready``) for its next wait. Edge-triggered means an event comes
    only when new data arrives, so a reader must not wait while data it has not read may
    remain: :meth:`RawSocketStream.receive_next` marks the socket ready again when a
    receive filled its whole buffer. It saves about a quarter of a request's CPU on a bare
    loop (docs/performance.md, "Figures behind the code").
    """

    __slots__ = ("_epoll", "_flusher", "_outbox", "_ready", "_waiting")

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._waiting: dict[int, trio.lowlevel.Task] = {}
        self._ready: set[int] = set()
        self._outbox: list[RawSocketStream] = []  # streams with an answer to write (send_soon)
        self._flusher: trio.lowlevel.Task | None = None  # the flusher, while it sleeps

    @property
    def open(self) -> bool:
        return not self._epoll.closed

    async def run(self) -> None:
        """Deliver the events and write the answers handed over, until cancelled (a task
        of the worker)."""
        epoll = self._epoll
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush)
                while True:
                    await trio.lowlevel.wait_readable(epoll.fileno())
                    for fd, _ in epoll.poll(0):
                        self.nudge(fd)
        finally:
            for stream in self._outbox:  # no flusher now: their own tasks write them
                stream.take_back()
            self._outbox.clear()
            for task in self._waiting.values():  # nobody would wake them now: let them look
                trio.lowlevel.reschedule(task)
            self._waiting.clear()
            epoll.close()

    async def _flush(self) -> None:
        """Write the answers of a pass, all together, in the pass after it (see
        :meth:`RawSocketStream.send_soon`)."""
        while True:
            if not self._outbox:
                self._flusher = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort_flush)
            outbox, self._outbox = self._outbox, []
            for stream in outbox:
                stream.write_posted()

    def _abort_flush(self, _: Any) -> trio.lowlevel.Abort:
        self._flusher = None
        return trio.lowlevel.Abort.SUCCEEDED

    def post(self, stream: RawSocketStream) -> None:
        """``stream`` has an answer to write: the flusher writes it in the next pass."""
        self._outbox.append(stream)
        flusher, self._flusher = self._flusher, None
        if flusher is not None:
            trio.lowlevel.reschedule(flusher)

    def nudge(self, fd: int) -> None:
        """Wake the task waiting on ``fd``, or let its next wait return at once."""
        task = self._waiting.pop(fd, None)
        if task is None:
            self._ready.add(fd)
        else:
            trio.lowlevel.reschedule(task)

    def register(self, fd: int) -> None:
        try:
            self._epoll.register(fd, select.EPOLLIN | select.EPOLLET)
        except ValueError:  # the epoll is closed (the worker is ending): wait() uses trio's
            pass

    def mark_ready(self, fd: int) -> None:
        self._ready.add(fd)

    def forget(self, fd: int) -> None:
        """Before ``fd`` is closed: unregister it, and wake a task waiting on it (it then
        finds the stream closed)."""
        self._ready.discard(fd)
        task = self._waiting.pop(fd, None)
        if task is not None:
            trio.lowlevel.reschedule(task)
        try:
            self._epoll.unregister(fd)
        except (OSError, ValueError):  # the epoll is closed already (the worker ends)
            pass

    def wait(self, fd: int) -> Awaitable[Any]:
        """Await it: until ``fd`` has news (a checkpoint, like trio's waits). A plain
        function that returns trio's wait to await: one coroutine less in the chain that
        every wake-up of a connection's task goes through."""
        if self._epoll.closed:  # the worker is ending: trio's own wait
            return trio.lowlevel.wait_readable(fd)
        if fd in self._ready:
            self._ready.discard(fd)
            return trio.lowlevel.checkpoint()  # a trip through the scheduler, for fairness
        task = trio.lowlevel.current_task()
        self._waiting[fd] = task

        def abort(_: Any) -> trio.lowlevel.Abort:
            if self._waiting.get(fd) is task:
                del self._waiting[fd]
            return trio.lowlevel.Abort.SUCCEEDED

        return trio.lowlevel.wait_task_rescheduled(abort)


class RawSocketStream(trio.abc.HalfCloseableStream):
    __slots__ = (
        "_closed",
        "_fresh",
        "_in_wait",
        "_interrupted",
        "_out",
        "_out_error",
        "_posted",
        "_registered",
        "_trio_waits",
        "socket",
        "waiter",
        "watch",
    )

    def __init__(
        self, sock: socket.socket, nodelay: bool = True, waiter: EdgeWaiter | None = None
    ) -> None:
        """``nodelay=False`` when the socket has TCP_NODELAY already (accepted from a
        listening socket that has it: Linux copies it to every accepted socket).
        ``waiter``: the worker's EdgeWaiter, for receive_next (else trio's waits)."""
        sock.setblocking(False)
        if nodelay and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket = sock
        self._closed = False
        self._fresh = True  # no receive yet: the first one need not yield (docstring)
        self._registered = -1  # the fd while registered with the waiter
        self._out = b""  # an answer handed over with send_soon, not written yet
        self._posted = False  # ... and the waiter's flusher is to write it
        self._out_error: OSError | None = None  # what the flusher's write met
        # trio's epoll may know the socket: close() must tell it (notify_closing), which
        # costs a failing epoll_ctl when it does not
        self._trio_waits = False
        self._in_wait = False  # the stream's task waits for the kernel (see interrupt)
        self._interrupted = False
        self.waiter = waiter
        self.watch: SendWatch | None = None

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._out or self._out_error is not None:
            await self._settle(watched=True)
        sock = self.socket
        waited = False
        while True:
            try:
                data = sock.recv(max_bytes or RECEIVE_SIZE)
            except BlockingIOError:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed") from None
                waited = True
                await self._wait(trio.lowlevel.wait_readable, sock)
                continue
            except OSError as exc:
                raise self._translate(exc) from exc
            if self._fresh:
                self._fresh = False  # the task was started just now: no yield
            elif not waited:
                await trio.lowlevel.cancel_shielded_checkpoint()  # see the module docstring
            return data

    async def receive_next(self, max_bytes: int | None = None) -> bytes:
        """Like receive_some, but waits for the socket to be readable first: for the next
        request of a keep-alive connection, which has rarely arrived the moment the
        response left. That spares the recv that fails with EAGAIN, and its exception,
        on most requests; one that is already here is read at the next epoll round."""
        if self._closed:
            raise trio.ClosedResourceError("stream closed")
        sock = self.socket
        size = max_bytes or RECEIVE_SIZE
        waiter = self.waiter
        while True:  # wait, then read; wait again after an EAGAIN
            if self._out_error is not None or (self._out and not self._posted):
                # what the flusher could not write: this task's to finish (its watch
                # gives it the send timeout, then the wait for the request begins anew)
                await self._settle(watched=True)
            if waiter is None:
                await self._wait(trio.lowlevel.wait_readable, sock)
            else:
                if self._registered < 0:  # data already here makes an event at once
                    self._registered = sock.fileno()
                    waiter.register(self._registered)
                await self._wait(waiter.wait, self._registered)
            try:
                data = sock.recv(size)
            except BlockingIOError:
                if self._closed:
                    raise trio.ClosedResourceError("stream closed") from None
                continue
            except OSError as exc:
                raise self._translate(exc) from exc
            if waiter is not None and len(data) == size:
                waiter.mark_ready(self._registered)  # more may wait, and no new edge says so
            return data

    def send_soon(self, data: bytes) -> bool:
        """Hand a small answer to the waiter's flusher, which writes it with the other
        answers of this pass in the next one, and return at once: the task goes straight
        on to wait for the next request (one trip through the scheduler less than
        ``send_all``). False if it cannot be taken (no waiter, closed, an answer still
        pending): then ``send_all``. What the flusher cannot write at once, or an error
        it meets, the stream's next call finishes or raises."""
        waiter = self.waiter
        if self._out or self._closed or waiter is None or not waiter.open:
            return False
        self._out = data
        self._posted = True
        waiter.post(self)
        return True

    def send_nowait(self, data: bytes) -> bytes:
        """Write what the kernel takes of ``data`` now, never waiting, and return the
        rest: all of it while an answer handed to the flusher is not written (it goes
        first), nothing once the stream is closed or broken. For a last word before the
        close that needs no wait when the kernel has room (TLS's close_notify)."""
        if self._closed:
            return b""
        if self._out or self._out_error is not None:
            return data
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            return data
        except OSError:
            return b""  # the close finds it broken too
        return data[sent:]

    @property
    def can_send_soon(self) -> bool:
        """send_soon would take an answer now (for a stream above this one that must
        know before it commits to the bytes: TLS, whose records cannot be unmade)."""
        waiter = self.waiter
        return not self._out and not self._closed and waiter is not None and waiter.open

    def write_posted(self) -> None:
        """The flusher's write of an answer handed over with send_soon."""
        data = self._out
        if not self._posted or not data or self._closed:
            return  # taken back by the stream's own task meanwhile, or closed
        self._posted = False
        try:
            sent = self.socket.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._out, self._out_error = b"", exc
            sent = -1
        if sent == len(data):
            self._out = b""
            return
        if sent > 0:
            self._out = data[sent:]
        if self._registered >= 0 and self.waiter is not None:
            self.waiter.nudge(self._registered)  # the task finishes it (receive_next)

    def take_back(self) -> None:
        """The flusher will not write the answer handed over: the stream's task will."""
        self._posted = False

    async def _settle(self, watched: bool) -> None:
        """Before anything else on the stream: write what send_soon left pending, or raise
        the error its write met."""
        error, self._out_error = self._out_error, None
        if error is not None:
            raise self._translate(error) from error
        data, self._out, self._posted = self._out, b"", False
        if data:
            await self._send(data, watched)

    @property
    def pending(self) -> bool:
        """An answer handed over with send_soon is not written yet."""
        return bool(self._out)

    async def flush_pending(self) -> None:
        """Before a close: write what send_soon left pending (errors are the close's)."""
        if self._out:
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await self._settle(watched=False)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        # first to the back of the run queue: the answers of one pass go out together
        # (see the module docstring)
        await trio.lowlevel.cancel_shielded_checkpoint()
        await self.send_final(data)

    async def send_final(self, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` now, without send_all's yield: for the connection's last answer
        (its close follows at once; send_all is this after its yield). Holding it for the
        pass would only delay the answer and the FIN while the client waits to connect
        again (measured with a new connection per request: docs/performance.md, "Figures
        behind the code")."""
        if self._out or self._out_error is not None:
            await self._settle(watched=True)
        await self._send(data, True)

    async def _send(self, data: bytes | bytearray | memoryview, watched: bool) -> None:
        sock = self.socket
        watch = self.watch if watched else None
        total = len(data)
        sent = 0
        view = None
        stalled_at = -1  # how much was sent when the send last stalled (-1: never)
        try:
            while sent < total:
                try:
                    if not sent:
                        sent = sock.send(data)  # usually all of it, at once
                    else:
                        view = view or memoryview(data)
                        sent += sock.send(view[sent:])
                except BlockingIOError:
                    if self._closed:
                        raise trio.ClosedResourceError("stream closed") from None
                    if sent != stalled_at and watch is not None:
                        watch.send_stalled()  # first stall, or the client took some
                    stalled_at = sent
                    await self._wait(trio.lowlevel.wait_writable, sock)
                except OSError as exc:
                    raise self._translate(exc) from exc
        finally:
            if stalled_at >= 0 and watch is not None:
                watch.send_resumed()  # also when the wait was cancelled

    async def wait_send_all_might_not_block(self) -> None:
        await self._wait(trio.lowlevel.wait_writable, self.socket)

    async def _wait(self, wait: Any, target: Any) -> None:
        """``wait(target)``: trio's ``wait_readable`` or ``wait_writable`` on the socket,
        or the edge waiter's wait on its fd; :meth:`interrupt` can end either."""
        if self._interrupted:
            raise trio.ClosedResourceError("the connection's deadline passed")
        if target is self.socket:  # trio's epoll knows the socket from now on
            self._trio_waits = True
        self._in_wait = True
        try:
            await wait(target)  # interrupt ends it: ClosedResourceError, or a wake-up
        finally:
            self._in_wait = False
        if self._interrupted:  # woken by the kernel just before the interrupt came
            raise trio.ClosedResourceError("the connection's deadline passed")

    def interrupt(self) -> bool:
        """A deadline of the connection passed (``ServerState.sweep``): end the wait its
        task is in, and any wait after it, with ClosedResourceError. The connection needs
        no cancel scope of its own for its deadlines then (entering and leaving one cost
        about 6 us, a tenth of a new connection's time in the worker). False, and nothing
        done, if the task is not waiting: it is running, and its deadline changes soon."""
        if not self._in_wait or self._closed:
            return False
        self._interrupted = True
        if self._registered >= 0 and self.waiter is not None:
            self.waiter.nudge(self._registered)
        trio.lowlevel.notify_closing(self.socket)
        return True

    def resume(self) -> None:
        """Waits work again after :meth:`interrupt` (for a late answer, then the close).

        Safe with trio's epoll backend although the socket stays open after
        ``notify_closing``: that call wakes trio's waiters on the fd with
        ClosedResourceError and drops trio's registration of it (an EPOLL_CTL_DEL whose
        failure trio ignores); it does not close the fd. The next ``wait_readable`` or
        ``wait_writable`` registers the fd anew. The fd cannot have been reused by another
        socket in between, since it was never closed (test_rawstream tests it)."""
        self._interrupted = False

    def lend_socket(self) -> socket.socket:
        """The socket, for a reader that waits on it with trio itself (the WebSocket's):
        close() then wakes such a wait."""
        self._trio_waits = True
        return self.socket

    async def send_eof(self) -> None:
        if self._out or self._out_error is not None:
            await self._settle(watched=True)
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError as exc:
            raise self._translate(exc) from exc
        await trio.lowlevel.checkpoint()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()

    def close(self) -> None:
        if not self._closed:
            if self._out:  # the last chance of an answer handed over (see flush_pending)
                with contextlib.suppress(OSError):
                    self.socket.send(self._out)
                self._out = b""
            self._closed = True
            if self._registered >= 0 and self.waiter is not None:
                self.waiter.forget(self._registered)
            if self._trio_waits:  # a task may wait on it in trio: wake it
                trio.lowlevel.notify_closing(self.socket)
            try:  # the FIN goes now, even while the primary still holds its copy
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self.socket.close()

    def _translate(self, exc: OSError) -> Exception:
        if self._closed or exc.errno in _CLOSED_ERRNOS:
            return trio.ClosedResourceError("stream closed")
        return trio.BrokenResourceError(f"socket connection broken: {exc}")


class TrioWaits:
    """How the Trio runtime waits for a socket to be readable, by a deadline on its clock
    (``protocols.proxyproto.Waits``)."""

    def now(self) -> float:
        return trio.current_time()

    async def readable(self, sock: socket.socket, deadline: float) -> None:
        with trio.move_on_at(deadline) as scope:
            await trio.lowlevel.wait_readable(sock)
        if scope.cancelled_caught:
            raise TimeoutError("the socket was not readable in time")
