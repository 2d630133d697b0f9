"""Blocking code in a bounded pool of threads, calling back into the event loop: what a WSGI
app needs (``apps.wsgi``).

A worker has one :class:`ThreadPool` (``--threads`` threads: a ``trio.CapacityLimiter``
over trio's own thread cache, as ``trio.to_thread.run_sync`` uses them). Each call of the
blocking function is a :class:`Job`: the connection's task awaits it, and while the thread
runs, the thread asks that same task to do what only the event loop may do (read the
request body, send the response) with :meth:`Job.call` (waits for the answer: back-pressure)
or :meth:`Job.post` (does not wait: the last bytes of a response). Other connections,
timers and the worker's heartbeat go on meanwhile; a request that finds every thread busy
waits, in arrival order, for one to free up (the limiter is fair).

Why not ``trio.to_thread.run_sync`` and ``trio.from_thread.run`` themselves: a thread that
cannot be abandoned keeps its worker past the drain's deadline for as long as the app
blocks (a view stuck for an hour holds the worker for an hour, until the primary kills it),
and a thread that can be abandoned (``abandon_on_cancel=True``) has its calls back into
Trio run as system tasks, outside the connection's cancel scope and its deadlines, and a
task is spawned for each. A Job does both halves: its calls run in the connection's own task
(the send timeout, a drain's deadline and the sweeper's interruptions apply to them), and
when that task is cancelled the thread is abandoned: its next call back fails with
:class:`Abandoned`, the function ends as it will (a WSGI app's ``close()`` still runs),
and its thread goes back to the pool only then; the limiter's token is held until the
thread is really done, so the pool stays bounded.
"""

from __future__ import annotations

import collections
import logging
import queue
from collections.abc import Awaitable, Callable
from typing import Any

import outcome
import trio

log = logging.getLogger("trioherd.wsgi")

Message = tuple[Callable[..., Awaitable[Any]], tuple[Any, ...], "queue.SimpleQueue[Any] | None"]


class Abandoned(Exception):
    """The task that awaited this thread's job was cancelled (a drain's deadline, the
    connection's end): nothing the thread asks of the event loop will be done."""


class ThreadPool:
    """The worker's threads for blocking apps: at most ``size`` run at once."""

    __slots__ = ("limiter", "size", "token")

    def __init__(self, size: int) -> None:
        self.size = size
        self.limiter = trio.CapacityLimiter(size)
        self.token: trio.lowlevel.TrioToken | None = None  # the run's, on first use

    @property
    def busy(self) -> int:
        """Threads running a job now (abandoned ones included, until they return)."""
        return int(self.limiter.borrowed_tokens)


class _Done:
    """The thread's function returned (or raised): its outcome."""

    __slots__ = ("result",)

    def __init__(self, result: outcome.Outcome[Any]) -> None:
        self.result = result


class Job:
    """One call of a blocking function in a thread of a :class:`ThreadPool`.

    The task that awaits :meth:`run` serves the thread's calls back (:meth:`call`,
    :meth:`post`) in the order they come, in its own cancel scopes. The first exception
    one of them raised is kept in :attr:`failure`: it tells the caller what happened to
    the connection (a client gone, a body too large) even when the thread's function
    caught it and went on.
    """

    __slots__ = ("_abandoned", "_inbox", "_pool", "_replies", "_task", "failure")

    def __init__(self, pool: ThreadPool) -> None:
        self._pool = pool
        self._inbox: collections.deque[Message | _Done] = collections.deque()
        self._task: trio.lowlevel.Task | None = None  # while it waits for the thread
        self._abandoned = False
        self._replies: queue.SimpleQueue[outcome.Outcome[Any]] = queue.SimpleQueue()
        self.failure: BaseException | None = None

    # -- in the event loop -----------------------------------------------------------

    async def run(self, fn: Callable[[], Any]) -> outcome.Outcome[Any]:
        """Run ``fn()`` in a thread once one is free, serving its calls back until it
        returns; its outcome. If this task is cancelled, the thread is abandoned."""
        pool = self._pool
        if pool.token is None:
            pool.token = trio.lowlevel.current_trio_token()
        await trio.lowlevel.checkpoint_if_cancelled()  # no thread for a cancelled task
        try:  # a free thread: no trip through the scheduler (the usual case)
            pool.limiter.acquire_on_behalf_of_nowait(self)
        except trio.WouldBlock:
            await pool.limiter.acquire_on_behalf_of(self)
        try:
            trio.lowlevel.start_thread_soon(fn, self._deliver, "trioherd app thread")
        except BaseException:
            pool.limiter.release_on_behalf_of(self)
            raise
        try:
            return await self._serve_calls()
        except BaseException:
            self._abandon()
            raise

    async def _serve_calls(self) -> outcome.Outcome[Any]:
        inbox = self._inbox
        while True:
            if not inbox:
                self._task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort)
                continue
            message = inbox.popleft()
            if isinstance(message, _Done):
                return message.result
            afn, args, reply = message
            try:
                value = await afn(*args)
            except Exception as exc:
                if self.failure is None:
                    self.failure = exc
                if reply is not None:
                    reply.put(outcome.Error(exc))
                continue
            except BaseException:  # cancelled: the thread must not wait for an answer
                if reply is not None:
                    reply.put(outcome.Error(Abandoned()))
                raise
            if reply is not None:
                reply.put(outcome.Value(value))

    def _abort(self, _: Any) -> trio.lowlevel.Abort:
        self._task = None
        return trio.lowlevel.Abort.SUCCEEDED

    def _wake(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            trio.lowlevel.reschedule(task)

    def _abandon(self) -> None:
        """No more calls are served: the ones waiting are answered with Abandoned."""
        self._abandoned = True
        while self._inbox:
            message = self._inbox.popleft()
            if not isinstance(message, _Done) and message[2] is not None:
                message[2].put(outcome.Error(Abandoned()))

    def _arrive(self, message: Message) -> None:
        """A call from the thread (run by the event loop: run_sync_soon)."""
        if self._abandoned:
            if message[2] is not None:
                message[2].put(outcome.Error(Abandoned()))
            return
        self._inbox.append(message)
        self._wake()

    def _finished(self, result: outcome.Outcome[Any]) -> None:
        """The thread is done (run by the event loop): its token goes back to the pool."""
        self._pool.limiter.release_on_behalf_of(self)
        if self._abandoned:
            if isinstance(result, outcome.Error) and not isinstance(result.error, Abandoned):
                log.debug("an abandoned app thread ended with %r", result.error)
            return
        self._inbox.append(_Done(result))
        self._wake()

    # -- in the thread ---------------------------------------------------------------

    def _deliver(self, result: outcome.Outcome[Any]) -> None:
        token = self._pool.token
        assert token is not None
        try:
            token.run_sync_soon(self._finished, result)
        except trio.RunFinishedError:  # the worker is ending: nobody waits any more
            pass

    def _send(self, message: Message) -> None:
        token = self._pool.token
        assert token is not None
        try:
            token.run_sync_soon(self._arrive, message)
        except trio.RunFinishedError:
            raise Abandoned() from None

    def call(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """From the thread: ``await afn(*args)`` in the task that awaits this job, and
        wait for what it returns (or raises)."""
        self._send((afn, args, self._replies))
        return self._replies.get().unwrap()

    def post(self, afn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """From the thread: the same, without waiting; what it raises is kept in
        :attr:`failure` (the caller of :meth:`run` raises it)."""
        self._send((afn, args, None))
