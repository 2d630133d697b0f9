"""The herd's generations of code, and with ``--preload`` the molds that hold them.

A generation is one import of the app's code. Without ``--preload`` it is only a number:
the herd's first boot is generation 1 and every reload makes the next one, and each worker
imports the files on disk as it boots. With ``--preload`` (or ``--reload``, which implies
it) each generation is a mold (``worker.mold``): a process that imported the app once and
forks the generation's workers, so that every one of them, a respawn after a crash too,
runs the code of that import, whatever the files on disk say now.

:class:`Generations` makes a generation (:meth:`Generations.make`: with a mold, waits until
it imported the app, or raises WorkerBootError with the app's error), makes one current
(:meth:`Generations.adopt`: from then on respawns, recycles and scale-ups come from it),
and retires the molds no worker needs any more. :class:`MoldProcess` is the primary's handle on
one mold: it asks for a worker (:meth:`MoldProcess.fork`, a short request answered at once, made
from the Trio thread like ``Popen`` of a spawned worker) and reads what the mold says
(:meth:`MoldProcess.run`: ready, a boot error, how each of its workers ended).

How a forked worker never outlives the primary: its death signal is set towards the mold,
the mold's towards the primary (see ``worker.mold``). So a mold that dies takes its
workers with it; if it was the current one, the herd makes a new generation from the files
on disk (``Herd`` is told through ``lost``) and respawns the slots from it.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import subprocess
import time
from collections.abc import Callable, Iterable

import trio

from .. import _ipc
from .._config import Config
from .._errors import IPCProtocolError, WorkerBootError
from .forked import ForkedProcess
from .process import Launch, WorkerProcess, first_of, signal_name, start_python, wait_process

log = logging.getLogger("trioherd.primary")

MOLD_COMMAND = "import trioherd.worker.mold as m; m.main()"
FORK_TIMEOUT = 10.0
"""Seconds a mold has to answer a fork request; past it the mold is taken for hung, and
killed (its workers with it) so that a new one replaces it."""
CLOSE_WAIT = 5.0


class MoldProcess:
    """The primary's handle on one mold process: a generation of the code."""

    def __init__(
        self,
        generation: int,
        process: subprocess.Popen[bytes],
        ctl: socket.socket,
        news: _ipc.Channel,
    ) -> None:
        self.generation = generation
        self.process = process
        self.ctl = ctl
        self.news = news
        self.children: dict[int, ForkedProcess] = {}  # by pid, until the mold reaps them
        self.ready = trio.Event()
        self.gone = trio.Event()
        self.boot_error: str | None = None
        self.closing = False
        self.started_at = time.monotonic()

    @classmethod
    def start(cls, generation: int, config: Config, env: dict[str, str]) -> MoldProcess:
        """Start a mold and send it the config; OSError if no process can be started."""
        with contextlib.ExitStack() as ends:
            ctl, ctl_end = _ipc.channel_pair()
            news, news_end = _ipc.channel_pair()
            ends.callback(ctl_end.close)
            ends.callback(news_end.close)
            try:
                process = start_python(MOLD_COMMAND, {"--ctl": ctl_end, "--news": news_end}, env)
            except OSError:
                ctl.close()
                news.close()
                raise
        ctl.settimeout(FORK_TIMEOUT)
        ctl.send(
            _ipc.encode(
                "mold",
                v=_ipc.PROTOCOL_VERSION,
                generation=generation,
                config=config.to_wire(),
            )
        )
        return cls(generation, process, ctl, _ipc.Channel(news))

    @property
    def pid(self) -> int:
        return self.process.pid

    def fork(
        self, worker_id: int, channel_end: socket.socket, conns_end: socket.socket
    ) -> ForkedProcess:
        """A worker forked with these channel ends (its init comes from the primary, as a
        spawned worker's does). OSError if the mold cannot give one."""
        if self.gone.is_set() or self.closing:
            raise OSError(f"the mold of generation {self.generation} is gone")
        try:
            data = _ipc.encode("fork", id=worker_id)
            socket.send_fds(self.ctl, [data], [channel_end.fileno(), conns_end.fileno()])
            data, fds, _, _ = socket.recv_fds(self.ctl, 4096, 1, socket.MSG_CMSG_CLOEXEC)
        except OSError as exc:  # a mold that does not answer in time is broken: replace it
            self.kill()
            raise OSError(
                f"the mold of generation {self.generation} did not answer: {exc}"
            ) from None
        try:
            message = _ipc.decode(data)
            pid = message["pid"] if message["t"] == "forked" and len(fds) == 1 else 0
            problem = message.get("error") or f"it answered {message}"
        except IPCProtocolError as exc:
            pid, problem = 0, str(exc) if data else "it exited"
        if pid <= 0:
            _ipc.close_fds(fds)
            raise OSError(f"the mold of generation {self.generation} could not fork: {problem}")
        child = ForkedProcess(pid, fds[0])
        self.children[child.pid] = child
        return child

    async def run(self, lost: Callable[[MoldProcess], None]) -> None:
        """Read what the mold says until it exits, then reap it; ``lost`` is told if it
        died without being asked to."""
        try:
            while True:
                try:
                    batch = await self.news.receive_batch()
                except (_ipc.ChannelClosed, IPCProtocolError, OSError):
                    break
                for data, fds in batch:
                    _ipc.close_fds(fds)
                    self._heard(data)
            await wait_process(self.process)
        finally:
            self.news.close()
            self.ctl.close()
            for child in self.children.values():
                child.orphaned()  # it died with the mold
            self.children.clear()
            self.gone.set()
        if not self.closing:
            lost(self)

    def _heard(self, data: bytes) -> None:
        try:
            message = _ipc.decode(data)
        except IPCProtocolError as exc:
            log.error("the mold of generation %d sent %s", self.generation, exc)
            return
        kind = message["t"]
        if kind == "ready":
            self.ready.set()
        elif kind == "boot_error":
            self.boot_error = message["text"]
        elif kind == "exited":
            child = self.children.pop(message["pid"], None)
            if child is not None:
                child.report(message["code"])

    def describe_exit(self) -> str:
        code = self.process.returncode
        if code is not None and code < 0:
            return f"killed by {signal_name(-code)}"
        return f"exit code {code}"

    def close(self) -> None:
        """No more workers from it: it exits (its own workers die with it)."""
        self.closing = True
        with contextlib.suppress(OSError):
            self.ctl.shutdown(socket.SHUT_RDWR)

    def kill(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()


class Generations:
    """The generations of the herd's code; with preloading, their molds."""

    def __init__(self, config: Config, env: dict[str, str]) -> None:
        self.config = config
        self.preload = config.preload or config.reload
        self.current = 0
        self.floor = 0
        """Workers of an older generation get no new connection (a reload is replacing
        them: its first new worker is ready)."""
        self.pending: int | None = None
        """The generation a reload is bringing the herd to (made, not adopted yet)."""
        self.molds: dict[int, MoldProcess] = {}
        self.nursery: trio.Nursery | None = None  # where the molds are read: set by the herd
        self.lost: Callable[[MoldProcess], None] = lambda mold: None
        self._env = env
        self._next = 1

    def launcher(self, generation: int) -> Launch | None:
        """How a worker of ``generation`` is made: forked by its mold, or (None) spawned."""
        mold = self.molds.get(generation)
        if mold is not None:
            return mold.fork
        if self.preload:
            raise OSError(f"generation {generation} has no mold")
        return None

    async def make(self) -> int:
        """A new generation (not current yet). With preloading, a mold that imported the
        code on disk now; WorkerBootError with the app's error if it did not."""
        generation = self.pending = self._next  # (pending: not retired while it imports)
        self._next += 1
        if not self.preload:
            return generation
        assert self.nursery is not None
        try:
            mold = MoldProcess.start(generation, self.config, self._env)
        except OSError as exc:
            self.pending = None
            raise WorkerBootError(f"cannot start a mold: {exc}") from None
        self.molds[generation] = mold
        self.nursery.start_soon(mold.run, self._lost)
        try:
            with trio.move_on_after(self.config.boot_timeout) as waited:
                await first_of(mold.ready, mold.gone)
        finally:
            if not mold.ready.is_set():
                self.drop(generation)
        if not mold.ready.is_set():
            await mold.gone.wait()
            late = f"the mold did not import the app in {self.config.boot_timeout:g}s"
            text = late if waited.cancelled_caught else f"the mold exited: {mold.describe_exit()}"
            raise WorkerBootError(mold.boot_error or text)
        took = time.monotonic() - mold.started_at
        # during the first boot at debug: ``listening on`` is the first line at info
        log.log(
            logging.INFO if self.current else logging.DEBUG,
            "generation %d: the app imported in %.2fs (mold pid %d)",
            generation,
            took,
            mold.pid,
        )
        return generation

    def adopt(self, generation: int) -> None:
        """From now on new workers are of ``generation``."""
        self.current = self.floor = generation
        self.pending = None

    def abandon(self, generation: int) -> None:
        """A reload to ``generation`` failed: the current one serves on (its workers get
        connections again); the mold goes once its workers are gone."""
        if self.pending == generation:
            self.pending = None
        self.floor = self.current

    def drop(self, generation: int) -> None:
        """Stop the mold of ``generation`` at once (its workers die with it)."""
        if self.pending == generation:
            self.pending = None
        mold = self.molds.pop(generation, None)
        if mold is not None:
            mold.closing = True
            mold.kill()

    def retire(self, workers: Iterable[WorkerProcess]) -> None:
        """Close the molds of past generations no live worker is of (and of the
        generations a failed reload made)."""
        needed = {worker.generation for worker in workers} | {self.current, self.pending}
        for generation in [g for g in self.molds if g not in needed]:
            self.molds.pop(generation).close()

    async def close(self) -> None:
        """The herd's end: every mold exits (after its workers were killed)."""
        molds, self.molds = list(self.molds.values()), {}
        for mold in molds:
            mold.close()
        for mold in molds:
            with trio.move_on_after(CLOSE_WAIT):
                await mold.gone.wait()
            mold.kill()
            with trio.move_on_after(CLOSE_WAIT):  # reaped, also if its reader was cancelled
                await wait_process(mold.process)

    def _lost(self, mold: MoldProcess) -> None:
        # (one that died before it was ready is make()'s to report)
        if self.molds.get(mold.generation) is mold and mold.ready.is_set():
            del self.molds[mold.generation]
            log.warning(
                "the mold of generation %d (pid %d) died (%s); its workers died with it",
                mold.generation,
                mold.pid,
                mold.describe_exit(),
            )
            self.lost(mold)

    def describe(self) -> list[dict[str, int]]:
        """The molds, for ``status``."""
        return [{"generation": g, "pid": mold.pid} for g, mold in sorted(self.molds.items())]
