"""The primary's handle on one worker process: spawn it, signal it, wait for it.

:class:`WorkerProcess` is what ``herd.workers`` lists; :class:`Slot` is a stable place in
the herd that successive worker processes fill (PM2's NODE_APP_INSTANCE). Nothing here
decides anything: the herd (``primary.herd``) supervises, the hand-off (``primary.handoff``) counts
connections, and the policy (``_policy``) says what an exit means.

Workers are spawned with ``subprocess.Popen`` from the thread that runs the primary's Trio
loop, never through ``trio.lowlevel.open_process``: trio forks from a worker thread, and
the worker's PR_SET_PDEATHSIG fires when the *thread* that forked it exits. With
``--preload`` a mold forks them instead (``launch``, ``primary.molds``), and the herd holds
each through a pidfd (``primary.forked``).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from .. import _ipc
from .._config import Config
from .._errors import IPCProtocolError
from .._listeners import Listener
from .._policy import ExitFacts, request_limit, should_recycle
from .._tally import Tally
from . import sched as _sched
from .events import HerdEvent
from .forked import ForkedProcess

log = logging.getLogger("trioherd.primary")

KILL_MARGIN = 2.0

_WORKER_COMMAND = "import trioherd.worker.main as w; w.main()"

Launch = Callable[[int, socket.socket, socket.socket], ForkedProcess]
"""How a mold makes a worker: (worker id, control channel end, connection channel end)."""


@attrs.define(eq=False)
class Slot:
    """A place in the herd; its worker changes on every respawn or replacement."""

    index: int
    worker: WorkerProcess | None = None
    restarts: int = 0
    failures: int = 0
    active: bool = True
    backoff_until: float | None = None
    lock: trio.Lock = attrs.Factory(trio.Lock)
    """Held while the slot's worker is being replaced (reload, recycle)."""


class WorkerState(enum.StrEnum):
    """Where a worker is in its life, as the primary sees it (equal to its name as a
    string, so ``worker.state == "ready"`` holds, and JSON shows the name)."""

    STARTING = "starting"
    """Spawned, not ready yet: gets no connections."""
    READY = "ready"
    """Said ready: in dispatch unless withdrawn, paused or stalled."""
    DISCONNECTING = "disconnecting"
    """Told to drain (stop, reload, recycle, scale-down, or its own SIGTERM)."""
    EXITED = "exited"
    """Its process is gone and reaped."""


@attrs.define(eq=False)
class WorkerProcess:
    """A worker process as the primary sees it (``herd.workers`` lists these, live)."""

    id: int
    slot: Slot
    pid: int
    process: subprocess.Popen[bytes] | ForkedProcess = attrs.field(repr=False)
    channel: _ipc.Channel = attrs.field(repr=False)
    conns: _ipc.Channel = attrs.field(repr=False)
    """The connection channel's sending end (fds to the worker)."""
    recall: _ipc.Channel = attrs.field(repr=False)
    """The primary's copy of the connection channel's receiving end: whatever the primary
    takes out of it, the worker never sees (the kernel hands each packet to one reader)."""
    tally: Tally = attrs.field(repr=False)
    """The counters the worker keeps in memory shared with the primary: the last batch it
    took, the connections it opened and closed."""
    state: WorkerState = WorkerState.STARTING
    generation: int = 0
    """The code it runs: the import (with --preload, the mold) it was made from."""
    started_at: float = attrs.field(factory=time.monotonic)
    ready_at: float | None = None
    dispatched: int = 0  # written by the hand-off only
    unacknowledged: int = 0
    """Connections passed (or about to be) that the worker has not acknowledged yet;
    written by the hand-off only."""
    stats: dict[str, Any] = attrs.Factory(dict)
    last_seen: float = 0.0
    requested_disconnect: bool = False
    boot_error: str | None = None
    request_limit: int = 0
    recycling: str | None = None
    recycle_after: float = 0.0
    killed_for: str | None = None
    protocol_error: bool = False
    drained_itself: bool = False
    shared: bool = False
    exit_code: int | None = None
    exit_signal: str | None = None
    ready_event: trio.Event = attrs.field(factory=trio.Event, repr=False)
    exited_event: trio.Event = attrs.field(factory=trio.Event, repr=False)

    @property
    def open_connections(self) -> int:
        """Connections the worker holds open; for the primary's dispatch, also those on
        their way to it."""
        if self.shared:  # the worker accepts for itself
            return self.tally.open
        return self.dispatched - self.tally.closed

    @property
    def requests(self) -> int:
        return int(self.stats.get("requests", 0))

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def restarts(self) -> int:
        return self.slot.restarts

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def rss(self) -> int:
        """Resident set size in bytes, from /proc (0 once the process is gone)."""
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as file:
                return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            return 0

    def kill(self, signum: int, reason: str | None = None) -> None:
        """Send ``signum`` if the process still runs; ``reason`` is remembered for the
        exit line (the first reason given wins)."""
        if reason is not None and self.killed_for is None:
            self.killed_for = reason
        with contextlib.suppress(ProcessLookupError):
            if self.process.poll() is None:
                self.process.send_signal(signum)

    async def wait(self) -> None:
        """Wait until the process has exited, and reap it."""
        await wait_process(self.process)

    # -- the channel ---------------------------------------------------------------------

    async def read_channel(self, handle: Callable[[dict[str, Any], list[int]], None]) -> None:
        """Give every message the worker sends to ``handle`` until the channel closes.
        Raises IPCProtocolError at the first malformed packet (its fds are closed)."""
        while True:
            try:
                batch = await self.channel.receive_batch()
            except _ipc.ChannelClosed:
                return
            self.last_seen = trio.current_time()
            for data, fds in batch:
                _handle_packet(handle, data, fds)

    def drain_channel(self, handle: Callable[[dict[str, Any], list[int]], None]) -> None:
        """Handle what an exited worker sent that was not read yet (its last words:
        final counters, a boot error); stop quietly at anything malformed."""
        if self.protocol_error:
            return
        while True:
            try:
                data, fds = self.channel.receive_nowait()
                _handle_packet(handle, data, fds)
            except (BlockingIOError, _ipc.ChannelClosed, IPCProtocolError, OSError):
                return

    async def tell_disconnect(self, grace: float) -> None:
        """Ask the worker to drain within ``grace`` (the hand-off's end marker tells it
        when it has every connection meant for it)."""
        with contextlib.suppress(_ipc.ChannelClosed, OSError):
            await self.channel.send(_ipc.encode("disconnect", grace=grace))

    async def watchdog(self, boot_timeout: float, worker_timeout: float) -> None:
        """Kill the worker if it is silent for boot_timeout before ready, worker_timeout
        after."""
        while True:
            ready = self.ready_at is not None
            limit = worker_timeout if ready else boot_timeout
            deadline = self.last_seen + limit
            if trio.current_time() >= deadline:
                what = "heartbeat" if ready else "ready message"
                log.error(
                    "worker %d (pid %d) sent no %s for %.1fs; killing it",
                    self.id,
                    self.pid,
                    what,
                    limit,
                )
                self.kill(signal.SIGKILL, "timeout")
                return
            with trio.move_on_at(deadline):
                if ready:
                    await trio.sleep_forever()
                await self.ready_event.wait()  # then the shorter worker_timeout applies

    async def disconnect(self, grace: float, tell: bool) -> None:
        """Wait for the worker to exit within ``grace`` (having asked it to drain, if
        ``tell``); SIGTERM past it plus a margin, then SIGKILL."""
        with trio.move_on_after(grace + KILL_MARGIN):
            # the send is inside the deadline: a worker too hung to read it is escalated
            # like one that does not finish
            if tell:
                await self.tell_disconnect(grace)
            await self.exited_event.wait()
            return
        log.warning("worker %d (pid %d) did not exit in time; SIGTERM", self.id, self.pid)
        self.kill(signal.SIGTERM)
        with trio.move_on_after(KILL_MARGIN):
            await self.exited_event.wait()
            return
        log.warning("worker %d (pid %d) ignored SIGTERM; SIGKILL", self.id, self.pid)
        self.kill(signal.SIGKILL)
        await self.exited_event.wait()

    # -- the end ---------------------------------------------------------------------------

    def take_back_queued(self) -> tuple[set[int], bool]:
        """Take every packet still queued for this worker out of its connection channel
        (through the primary's copy of its receiving end: what is taken here, the worker
        never gets), closing the fds that came with them (the primary holds its own
        copies). The sequence numbers of the batches taken, and whether the end marker
        was among them."""
        taken: set[int] = set()
        end = False
        while True:
            try:
                data, copies = self.recall.receive_nowait()
            except (BlockingIOError, _ipc.ChannelClosed, IPCProtocolError, OSError):
                return taken, end
            _ipc.close_fds(copies)  # the same connections as the primary's own copies
            try:
                listener, seq = _ipc.decode_conn(data)
            except IPCProtocolError:
                continue
            if listener == _ipc.END_OF_CONNS:
                end = True
            else:
                taken.add(seq)

    def record_exit(self) -> None:
        code = self.process.returncode
        if code is not None and code < 0:
            self.exit_signal = signal_name(-code)
        else:
            self.exit_code = code
        self.state = WorkerState.EXITED

    def recycle_reason(self, rss: int, max_memory: int) -> str | None:
        """Why this worker should be replaced now (max-requests, max-memory), or None;
        ``rss`` is its resident size in bytes, read by the caller (0 without max_memory)."""
        if self.state is not WorkerState.READY or self.recycling:
            return None
        if self.recycle_after and trio.current_time() < self.recycle_after:
            return None  # its last replacement failed to boot: wait before trying again
        if not (self.request_limit or max_memory):
            return None
        return should_recycle(self.requests, self.request_limit, rss, max_memory)

    def over_limit(self, rss: int, max_memory: int) -> bool:
        """It served its max-requests or grew past max-memory (MiB)."""
        if self.request_limit and self.requests >= self.request_limit:
            return True
        return bool(max_memory) and rss > max_memory * 1024 * 1024

    def exit_facts(
        self, successor_wanted: bool, boot_failures: int, others_ready: int
    ) -> ExitFacts:
        """What the policy needs to know about this worker's exit."""
        return ExitFacts(
            others_ready=others_ready,
            successor_wanted=successor_wanted,
            drained_itself=self.drained_itself,
            was_ready=self.ready_at is not None,
            uptime=self.uptime,
            killed_for=self.killed_for,
            boot_failures=boot_failures,
            slot_failures=self.slot.failures,
        )

    def died_how(self) -> str:
        """How a worker that never became ready ended, for the give-up message."""
        return f"exited before it was ready: {self.describe_exit()}"

    def event(self, kind: str, data: Any = None) -> HerdEvent:
        """The herd event ``kind`` about this worker (an exit carries how it ended)."""
        if kind != "exit":
            return HerdEvent(kind, self.id, self.pid, self.slot.index, data)
        return HerdEvent(
            kind,
            self.id,
            self.pid,
            self.slot.index,
            exit_code=self.exit_code,
            signal=self.exit_signal,
            requested=self.requested_disconnect,
        )

    def describe_exit(self) -> str:
        if self.exit_signal:
            text = f"killed by {self.exit_signal}"
            if self.killed_for:
                text += f" (killed by trioherd: {self.killed_for})"
            elif self.exit_signal == "SIGKILL" and not self.requested_disconnect:
                text += " (perhaps out of memory?)"
            return text
        return f"exit code {self.exit_code}"

    def as_dict(self) -> dict[str, Any]:
        """One row of ``status --json``."""
        return {
            "id": self.id,
            "slot": self.slot.index,
            "pid": self.pid,
            "state": self.state,
            "generation": self.generation,
            "uptime": round(self.uptime, 3),
            "restarts": self.slot.restarts,
            "connections": self.open_connections,
            "requests": self.requests,
            "rss": self.rss(),
        }


def worker_env() -> dict[str, str]:
    """The environment of every worker: the primary's, less what belongs to the primary
    alone (systemd's socket activation and notify socket), with its import path."""
    env = dict(os.environ)
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
        env.pop(key, None)
    paths = [entry or os.getcwd() for entry in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def start_python(
    code: str, ends: Mapping[str, socket.socket], env: dict[str, str]
) -> subprocess.Popen[bytes]:
    """Start ``python -c CODE --FLAG FD ... --ppid PID`` (a worker, or a mold) with the
    socket ends inherited under their flags, in a session of its own, under the scheduling
    policy the primary had before ``--batch-primary``. From the primary's main thread: the
    child's death signal is tied to the thread that forked it."""
    command = [sys.executable, "-c", code]
    for flag, end in ends.items():
        command += [flag, str(end.fileno())]
    command += ["--ppid", str(os.getpid())]
    with _sched.unbatched():
        return subprocess.Popen(
            command,
            pass_fds=[end.fileno() for end in ends.values()],
            start_new_session=True,
            env=env,
        )


def spawn(
    worker_id: int,
    slot: Slot,
    config: Config,
    listeners: list[Listener],
    env: dict[str, str],
    ticket_keys: bytes = b"",
    generation: int = 0,
    launch: Launch | None = None,
) -> WorkerProcess:
    """Start a worker interpreter (or have a mold fork one: ``launch``) and send it its
    init message (with the listening sockets, for the shared policy, and the herd's TLS
    session-ticket keys). Raises OSError when no process can be started."""
    limit = request_limit(config.max_requests, config.max_requests_jitter)
    shared = config.dispatch == "shared"
    init = _ipc.encode(
        "init",
        v=_ipc.PROTOCOL_VERSION,
        id=worker_id,
        slot=slot.index,
        limit=limit,
        families=[int(listener.sock.family) for listener in listeners],
        config=config.to_wire(),
        tickets=ticket_keys.hex(),
    )
    with contextlib.ExitStack() as ends:  # the worker's ends: closed once it has them
        tally, tally_fd = Tally.create()
        ends.callback(os.close, tally_fd)
        with contextlib.ExitStack() as undo:  # the primary's ends, if no worker starts
            undo.callback(tally.close)
            primary_end, worker_end = _ipc.channel_pair()
            undo.callback(primary_end.close)
            ends.callback(worker_end.close)
            conns_end, conns_worker_end = _ipc.channel_pair()
            undo.callback(conns_end.close)
            ends.callback(conns_worker_end.close)
            recall_end = conns_worker_end.dup()
            undo.callback(recall_end.close)
            process: subprocess.Popen[bytes] | ForkedProcess
            if launch is None:
                inherited = {"--fd": worker_end, "--conn-fd": conns_worker_end}
                process = start_python(_WORKER_COMMAND, inherited, env)
            else:
                process = launch(worker_id, worker_end, conns_worker_end)
            undo.pop_all()
        channel, conns, recall = (
            _ipc.Channel(end) for end in (primary_end, conns_end, recall_end)
        )
        fds = [tally_fd] + ([listener.sock.fileno() for listener in listeners] if shared else [])
        channel.try_send(init, fds)  # a fresh socket pair has room for it
    worker = WorkerProcess(worker_id, slot, process.pid, process, channel, conns, recall, tally)
    worker.shared = shared
    worker.generation = generation
    worker.request_limit = limit
    worker.last_seen = trio.current_time()
    return worker


def _handle_packet(
    handle: Callable[[dict[str, Any], list[int]], None], data: bytes, fds: list[int]
) -> None:
    """Decode one packet and give it to ``handle``; its fds are closed if it is malformed."""
    try:
        message = _ipc.decode(data)
        if fds:
            raise IPCProtocolError(f"fds attached to {message['t']!r}")
        handle(message, fds)
    except IPCProtocolError:
        _ipc.close_fds(fds)
        raise


def signal_name(number: int) -> str:
    """SIGKILL, SIGTERM, ... or 'signal 40' for one Python has no name for (realtime)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


async def wait_process(process: subprocess.Popen[bytes] | ForkedProcess) -> None:
    """Wait for the process to exit without a thread: a pidfd is readable once it has."""
    if isinstance(process, ForkedProcess):
        await process.wait()
        return
    if process.poll() is not None:
        await trio.lowlevel.checkpoint()
        return
    try:
        pidfd = os.pidfd_open(process.pid)
    except ProcessLookupError:
        process.wait()
        await trio.lowlevel.checkpoint()
        return
    except OSError:  # out of fds: poll instead
        while process.poll() is None:
            await trio.sleep(0.1)
        return
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    process.wait()


async def first_of(*events: trio.Event) -> None:
    """Wait until any of the events is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)
