"""The primary: one Trio run that owns the listeners and supervises the workers.

Task layout (all in the herd's nursery):
- one supervising task per worker process: it reads the worker's channel, watches its
  heartbeat, waits for the process to exit (pidfd), and decides what happens next;
- one accept task per listener (not with the ``shared`` policy): wait until readable, then
  accept raw fds until EAGAIN, give each to the dispatcher's choice, send them in batches of
  up to 16 per ``sendmsg`` and close the primary's copies at once;
- respawn tasks sleeping through a slot's back-off; the signal task; the control server.

fd ownership: an accepted fd belongs to the primary until ``sendmsg`` succeeds, then the
primary closes its copy and the worker owns the connection. An fd that could not be sent
(the worker died) or that a draining worker sent back is dispatched again, never dropped.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
import trio

from . import _ipc, _tls
from ._config import Config
from ._errors import IPCProtocolError, TrioherdError, WorkerBootError
from ._listeners import Listener, accept_fd, open_listeners
from ._policy import Dispatcher, backoff_delay, request_limit, should_recycle
from ._systemd import Notifier

log = logging.getLogger("trioherd.primary")

KILL_MARGIN = 2.0
EVENT_BUFFER = 1000
_WORKER_COMMAND = "import trioherd._worker as w; w.main()"


class StoppedBeforeReady(TrioherdError):
    """A stop (a signal, ``herd.stop()``) came while the herd was still booting.
    ``forced``: it was a stop at once (a second signal)."""

    forced = False


class ReloadError(TrioherdError):
    """A replacement worker failed to boot; the reload stopped and old workers still serve."""


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
class Slot:
    index: int
    worker: Worker | None = None
    restarts: int = 0
    failures: int = 0
    active: bool = True
    backoff_until: float | None = None


@attrs.define(eq=False)
class Worker:
    """A worker process as the primary sees it (``herd.workers`` lists these, live)."""

    id: int
    slot: Slot
    pid: int
    process: subprocess.Popen[bytes] = attrs.field(repr=False)
    channel: _ipc.Channel = attrs.field(repr=False)
    state: str = "starting"  # starting, ready, disconnecting, exited
    started_at: float = attrs.field(factory=time.monotonic)
    ready_at: float | None = None
    dispatched: int = 0
    closed: int = 0
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
        if self.shared:  # the worker accepts for itself: only it knows
            return int(self.stats.get("open", 0))
        return self.dispatched - self.closed

    @property
    def requests(self) -> int:
        return int(self.stats.get("requests", 0))

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_at

    @property
    def restarts(self) -> int:
        return self.slot.restarts

    def rss(self) -> int:
        """Resident set size in bytes, from /proc (0 once the process is gone)."""
        try:
            with open(f"/proc/{self.pid}/statm", "rb") as file:
                return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError, ValueError):
            return 0

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
        return {
            "id": self.id,
            "slot": self.slot.index,
            "pid": self.pid,
            "state": self.state,
            "uptime": round(self.uptime, 3),
            "restarts": self.slot.restarts,
            "connections": self.open_connections,
            "requests": self.requests,
            "rss": self.rss(),
        }


class Herd:
    """A running herd. Get one from ``await nursery.start(trioherd.serve, config)``."""

    def __init__(self, config: Config, listeners: list[Listener]) -> None:
        self.config = config
        self.listeners = listeners
        self.addresses: list[str] = [listener.url for listener in listeners]
        self.pid = os.getpid()
        self.reloads = 0
        self.respawns: dict[str, int] = {}
        self.forced = False
        self.metrics_url: str | None = None
        self._dispatcher: Dispatcher[Worker] = Dispatcher(config.dispatch, config.max_connections)
        self._slots: list[Slot] = []
        self._workers: list[Worker] = []
        self._exited_totals: dict[str, Any] = {"requests": 0, "bytes_in": 0, "bytes_out": 0}
        self._exited_status: dict[str, int] = {}
        self._next_id = 1
        self._nursery: trio.Nursery | None = None
        self._accept_scope = trio.CancelScope()
        self._capacity = trio.Event()
        self._subscribers: list[trio.MemorySendChannel[HerdEvent]] = []
        self._stopping = False
        self._stopped = trio.Event()
        self._boot_failures = 0
        self._last_boot_error = ""
        self._fatal: WorkerBootError | None = None
        self._rolling = trio.Lock()
        self._conn_messages = [_ipc.encode("conn", l=i) for i in range(len(listeners))]
        self._env = self._worker_env()
        self.on_state_change: Callable[[str], None] | None = Notifier(
            os.environ.get("NOTIFY_SOCKET")
        )

    # -- public API --------------------------------------------------------------------

    @property
    def workers(self) -> list[Worker]:
        """Live workers, by slot."""
        return sorted(self._workers, key=lambda w: (w.slot.index, w.id))

    @property
    def size(self) -> int:
        """How many worker slots the herd keeps."""
        return sum(1 for slot in self._slots if slot.active)

    @property
    def stopping(self) -> bool:
        return self._stopping

    def events(self, kind: str | None = None) -> AsyncIterator[HerdEvent]:
        """Every worker event (of ``kind``, if given) from this call on. The buffer is
        bounded: a reader that falls more than 1000 events behind misses the newest."""
        send, receive = trio.open_memory_channel[HerdEvent](EVENT_BUFFER)
        self._subscribers.append(send)
        return _EventStream(receive, lambda: self._unsubscribe(send), kind)

    def messages(self) -> AsyncIterator[HerdEvent]:
        """What workers sent with ``send_to_primary()``: events whose ``data`` is the object."""
        return self.events("message")

    async def broadcast(self, obj: Any) -> None:
        """Send ``obj`` to every ready worker (``trioherd.receive_from_primary()``)."""
        data = _ipc.encode("msg", data=obj)
        for worker in self.workers:
            if worker.state == "ready":
                with contextlib.suppress(_ipc.ChannelClosed):
                    await worker.channel.send(data)

    async def stop(self) -> None:
        """Graceful stop: stop accepting, disconnect every worker in parallel, wait."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        self._notify("stopping")
        log.info("stopping: disconnecting %d workers", len(self._workers))
        self._accept_scope.cancel()
        # close the listeners now: a client arriving during the drain is refused at once
        # instead of waiting in a backlog nobody will accept from
        for listener in self.listeners:
            trio.lowlevel.notify_closing(listener.sock)
            listener.close()
        for slot in self._slots:
            slot.active = False
        async with trio.open_nursery() as nursery:
            for worker in list(self._workers):
                nursery.start_soon(self._disconnect, worker, "stop")
            # workers that are still booting or in back-off go too
        self._stopped.set()

    def force_stop(self) -> None:
        """Stop at once: kill every worker."""
        self.forced = True
        self._stopping = True
        for worker in self._workers:
            worker.killed_for = "stop at once"
            _kill(worker, signal.SIGKILL)
        self._stopped.set()

    async def scale(self, count: int) -> None:
        """Keep ``count`` workers: spawn and wait for the new ones, or disconnect the oldest."""
        if count < 1:
            raise ValueError("a herd needs at least one worker")
        if self._stopping:
            return
        active = [slot for slot in self._slots if slot.active]
        if count > len(active):
            used = {slot.index for slot in self._slots}
            new_slots: list[Slot] = []
            index = 0
            while len(new_slots) < count - len(active):
                if index not in used:
                    slot = Slot(index)
                    self._slots.append(slot)
                    new_slots.append(slot)
                index += 1
            log.info("scaling up to %d workers", count)
            workers = []
            for slot in new_slots:
                try:
                    workers.append(self._spawn(slot))
                except OSError as exc:  # out of fds or memory: the slot retries later
                    log.error("could not start a worker for slot %d: %s", slot.index, exc)
                    assert self._nursery is not None
                    self._nursery.start_soon(self._respawn, slot, 1.0)
            for worker in workers:
                await _first(worker.ready_event, worker.exited_event)
        elif count < len(active):
            log.info("scaling down to %d workers", count)
            by_age = sorted(active, key=lambda s: s.worker.started_at if s.worker else math.inf)
            leaving = by_age[: len(active) - count]
            for slot in leaving:
                slot.active = False
            async with trio.open_nursery() as nursery:
                for slot in leaving:
                    if slot.worker is not None:
                        nursery.start_soon(self._disconnect, slot.worker, "scale down")
            self._slots = [slot for slot in self._slots if slot.active]
        self._notify("scaled")

    async def reload(self) -> None:
        """Rolling reload: per slot, start a replacement, wait until it is ready, then
        disconnect the old worker. One extra worker at a time; capacity never drops. If a
        replacement fails to boot, stop and raise ReloadError; old workers keep serving."""
        async with self._rolling:
            if self._stopping:
                return
            self.reloads += 1
            self._notify("reloading")
            log.info("reloading %d workers", self.size)
            try:
                for slot in list(self._slots):
                    if slot.active and not self._stopping:
                        await self._replace(slot, "reload")
            finally:
                if not self._stopping:
                    self._notify("ready")
            log.info("reload complete")

    # -- spawning and supervision -----------------------------------------------------

    def _worker_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "NOTIFY_SOCKET"):
            env.pop(key, None)
        paths = [entry or os.getcwd() for entry in sys.path]
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        return env

    def _spawn(self, slot: Slot, *, replacing: bool = False) -> Worker:
        assert self._nursery is not None
        primary_end, worker_end = _ipc.channel_pair()
        worker_id = self._next_id
        self._next_id += 1
        try:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _WORKER_COMMAND,
                    "--fd",
                    str(worker_end.fileno()),
                    "--ppid",
                    str(os.getpid()),
                ],
                pass_fds=[worker_end.fileno()],
                start_new_session=True,
                env=self._env,
            )
        except BaseException:
            primary_end.close()
            raise
        finally:
            worker_end.close()
        channel = _ipc.Channel(primary_end)
        worker = Worker(worker_id, slot, process.pid, process, channel)
        worker.shared = self.config.dispatch == "shared"
        worker.last_seen = trio.current_time()
        worker.request_limit = request_limit(
            self.config.max_requests, self.config.max_requests_jitter
        )
        fds = [listener.sock.fileno() for listener in self.listeners]
        init = _ipc.encode(
            "init",
            v=_ipc.PROTOCOL_VERSION,
            id=worker_id,
            slot=slot.index,
            limit=worker.request_limit,
            families=[int(listener.sock.family) for listener in self.listeners],
            config=self.config.to_wire(),
        )
        channel.try_send(init, fds if self.config.dispatch == "shared" else ())
        self._workers.append(worker)
        if not replacing:
            slot.worker = worker
        slot.backoff_until = None
        self._publish(HerdEvent("online", worker.id, worker.pid, slot.index))
        log.debug("spawned worker %d (pid %d) in slot %d", worker.id, worker.pid, slot.index)
        self._nursery.start_soon(self._supervise, worker)
        return worker

    async def _supervise(self, worker: Worker) -> None:
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_channel, worker)
                nursery.start_soon(self._watchdog, worker)
                await _wait_process(worker.process)
                nursery.cancel_scope.cancel()
            self._drain_channel(worker)  # its last words: final counters, boot error
        finally:
            with trio.CancelScope(shield=True):
                if worker.process.poll() is None:  # the herd itself is being cancelled
                    worker.killed_for = worker.killed_for or "shutdown"
                    _kill(worker, signal.SIGKILL)
                    await _wait_process(worker.process)
                worker.channel.close()
                self._on_exit(worker)

    def _drain_channel(self, worker: Worker) -> None:
        """Handle what an exited worker sent that was not read yet."""
        if worker.protocol_error:
            return
        while True:
            try:
                data, fds = worker.channel.receive_nowait()
            except (BlockingIOError, _ipc.ChannelClosed, IPCProtocolError, OSError):
                return
            try:
                message = _ipc.decode(data)
                if fds and message["t"] != "refuse":
                    raise IPCProtocolError(f"fds attached to {message['t']!r}")
                self._handle_message(worker, message, fds)
            except IPCProtocolError:
                _ipc.close_fds(fds)
                return

    async def _read_channel(self, worker: Worker) -> None:
        channel = worker.channel
        while True:
            try:
                batch = await channel.receive_batch()
            except _ipc.ChannelClosed:
                return
            except IPCProtocolError as exc:
                self._protocol_error(worker, exc)
                return
            worker.last_seen = trio.current_time()
            for data, fds in batch:
                try:
                    message = _ipc.decode(data)
                    if fds and message["t"] != "refuse":
                        raise IPCProtocolError(f"fds attached to {message['t']!r}")
                    self._handle_message(worker, message, fds)
                except IPCProtocolError as exc:
                    _ipc.close_fds(fds)
                    self._protocol_error(worker, exc)
                    return

    def _handle_message(self, worker: Worker, message: dict[str, Any], fds: list[int]) -> None:
        kind = message["t"]
        if kind == "closed":
            worker.closed += message["n"]
            self._signal_capacity()
        elif kind == "beat":
            if not _valid_stats(message["stats"]):
                raise IPCProtocolError(f"malformed counters {message['stats']!r}"[:200])
            worker.stats = message["stats"]
            self._check_recycle(worker)
        elif kind == "msg":
            self._publish(
                HerdEvent("message", worker.id, worker.pid, worker.slot.index, message["data"])
            )
        elif kind == "ready":
            if message["v"] != _ipc.PROTOCOL_VERSION:
                raise IPCProtocolError(f"worker speaks protocol v{message['v']}")
            self._on_ready(worker)
        elif kind == "refuse":
            worker.closed += len(fds)
            assert self._nursery is not None
            self._nursery.start_soon(self._dispatch_fds, fds, message["l"])
        elif kind == "boot_error":
            worker.boot_error = message["text"]
        elif kind == "draining":  # the worker drains on its own (SIGTERM): let it go
            worker.drained_itself = True
            if worker.state in ("starting", "ready"):
                worker.state = "disconnecting"
                self._dispatcher.remove(worker)
                self._publish(HerdEvent("disconnect", worker.id, worker.pid, worker.slot.index))
                assert self._nursery is not None
                self._nursery.start_soon(self._acknowledge_drain, worker)
        else:
            raise IPCProtocolError(f"a worker may not send {kind!r}")

    async def _acknowledge_drain(self, worker: Worker) -> None:
        """Tell a worker that drains on its own that no connection follows this message."""
        with contextlib.suppress(_ipc.ChannelClosed, OSError):
            grace = self.config.graceful_timeout
            await worker.channel.send(_ipc.encode("disconnect", grace=grace))

    def _protocol_error(self, worker: Worker, exc: Exception) -> None:
        worker.protocol_error = True
        log.error(
            "worker %d (pid %d) sent a malformed message (%s); replacing it",
            worker.id,
            worker.pid,
            exc,
        )
        self._dispatcher.remove(worker)
        self._recycle(worker, "protocol error")

    async def _watchdog(self, worker: Worker) -> None:
        """Kill a worker that is silent for boot_timeout before ready, worker_timeout after."""
        while True:
            ready = worker.ready_at is not None
            limit = self.config.worker_timeout if ready else self.config.boot_timeout
            deadline = worker.last_seen + limit
            if trio.current_time() >= deadline:
                what = "heartbeat" if ready else "ready message"
                log.error(
                    "worker %d (pid %d) sent no %s for %.1fs; killing it",
                    worker.id,
                    worker.pid,
                    what,
                    limit,
                )
                worker.killed_for = "timeout"
                _kill(worker, signal.SIGKILL)
                return
            with trio.move_on_at(deadline):
                if ready:
                    await trio.sleep_forever()
                await worker.ready_event.wait()  # then the shorter worker_timeout applies

    def _on_ready(self, worker: Worker) -> None:
        if worker.ready_at is not None:
            return
        worker.ready_at = trio.current_time()
        if worker.state == "starting":  # not if a stop or scale-down already reached it
            worker.state = "ready"
        self._boot_failures = 0
        if worker.state == "ready" and not self._stopping and worker.slot.active:
            self._dispatcher.add(worker)
        self._signal_capacity()
        worker.ready_event.set()
        self._publish(HerdEvent("ready", worker.id, worker.pid, worker.slot.index))
        log.debug("worker %d (pid %d) ready", worker.id, worker.pid)

    def _on_exit(self, worker: Worker) -> None:
        code = worker.process.returncode
        if code is not None and code < 0:
            worker.exit_signal = signal_name(-code)
        else:
            worker.exit_code = code
        worker.state = "exited"
        self._dispatcher.remove(worker)
        if worker in self._workers:
            self._workers.remove(worker)
        for key in ("requests", "bytes_in", "bytes_out"):  # checked when the beat came
            self._exited_totals[key] += int(worker.stats.get(key, 0))
        for key, count in dict(worker.stats.get("status", {})).items():
            self._exited_status[key] = self._exited_status.get(key, 0) + int(count)
        worker.exited_event.set()
        worker.ready_event.set()  # nobody waits forever on a worker that is gone
        self._publish(
            HerdEvent(
                "exit",
                worker.id,
                worker.pid,
                worker.slot.index,
                exit_code=worker.exit_code,
                signal=worker.exit_signal,
                requested=worker.requested_disconnect,
            )
        )
        slot = worker.slot
        if worker.drained_itself and not worker.requested_disconnect:
            log.info(
                "worker %d (pid %d) in slot %d drained on its own (SIGTERM) and exited (%s)",
                worker.id,
                worker.pid,
                slot.index,
                worker.describe_exit(),
            )
        elif worker.requested_disconnect:
            log.info(
                "worker %d (pid %d) exited after disconnect (%s)",
                worker.id,
                worker.pid,
                worker.describe_exit(),
            )
        else:
            log.warning(
                "worker %d (pid %d) in slot %d died: %s",
                worker.id,
                worker.pid,
                slot.index,
                worker.describe_exit(),
            )
        if slot.worker is not worker:
            return  # a replacement that never took over, or a replaced worker
        slot.worker = None
        assert self._nursery is not None
        if (
            worker.requested_disconnect
            or self._stopping
            or not slot.active
            or self._nursery.cancel_scope.cancel_called
        ):
            return
        if worker.drained_itself:  # SIGTERM sent to the worker: replace it, no penalty
            self._count_respawn("signal")
            self._nursery.start_soon(self._respawn, slot, 0.0)
            return
        if worker.ready_at is None:
            self._boot_failures += 1
            self._last_boot_error = worker.boot_error or (
                f"worker {worker.id} exited before it was ready: {worker.describe_exit()}"
            )
            if self._boot_failures >= self.config.max_boot_failures:
                self._give_up()
                return
        self._count_respawn(
            worker.killed_for or ("crash" if worker.ready_at is not None else "boot")
        )
        if worker.uptime >= self.config.min_uptime:
            slot.failures = 0
        slot.failures += 1
        slot.restarts += 1
        delay = backoff_delay(slot.failures, self.config.backoff_max)
        assert self._nursery is not None
        self._nursery.start_soon(self._respawn, slot, delay)

    def _give_up(self) -> None:
        text = self._last_boot_error
        log.critical(
            "%d workers in a row died before they became ready; giving up", self._boot_failures
        )
        self._fatal = WorkerBootError(text)
        assert self._nursery is not None
        self._nursery.start_soon(self.stop)

    async def _respawn(self, slot: Slot, delay: float) -> None:
        slot.backoff_until = trio.current_time() + delay
        log.info("respawning slot %d in %.1fs", slot.index, delay)
        await trio.sleep(delay)
        slot.backoff_until = None
        if slot.active and not self._stopping and slot.worker is None:
            try:
                self._spawn(slot)
            except OSError as exc:  # out of fds or memory: try again later
                slot.failures += 1
                delay = max(0.5, backoff_delay(slot.failures, self.config.backoff_max))
                log.error("could not start a worker for slot %d: %s", slot.index, exc)
                assert self._nursery is not None
                self._nursery.start_soon(self._respawn, slot, delay)

    def _count_respawn(self, cause: str) -> None:
        self.respawns[cause] = self.respawns.get(cause, 0) + 1

    # -- replacement: reload, recycling -----------------------------------------------

    async def _replace(self, slot: Slot, reason: str) -> bool:
        """Start a worker for ``slot``, wait until it is ready, then disconnect the old one.
        True if the replacement took over; False if a stop or scale-down made it moot.
        Raises ReloadError if it could not start or become ready."""
        try:
            new = self._spawn(slot, replacing=True)
        except OSError as exc:
            log.error("%s of slot %d failed: cannot start a worker: %s", reason, slot.index, exc)
            raise ReloadError(f"cannot start a worker: {exc}") from None
        with trio.move_on_after(self.config.boot_timeout) as waited:
            await _first(new.ready_event, new.exited_event)
        if self._stopping or not slot.active:
            # a stop or a scale-down came meanwhile: the replacement is not wanted
            if new.state != "exited":
                await self._disconnect(new, reason)
            return False
        if new.state != "ready":
            if new.exited_event.is_set():
                text = new.boot_error or f"replacement worker exited: {new.describe_exit()}"
            else:
                if waited.cancelled_caught:
                    new.killed_for = "not ready in time"
                    _kill(new, signal.SIGKILL)
                text = f"replacement worker {new.id} was not ready in time"
            log.error(
                "%s of slot %d failed; old workers keep serving:\n%s", reason, slot.index, text
            )
            raise ReloadError(text)
        previous = slot.worker
        slot.worker = new
        slot.failures = 0
        if previous is not None and previous.state != "exited":
            await self._disconnect(previous, reason)
        return True

    def _check_recycle(self, worker: Worker) -> None:
        if worker.state != "ready" or worker.recycling or self._stopping:
            return
        if worker.recycle_after and trio.current_time() < worker.recycle_after:
            return  # its last replacement failed to boot: wait before trying again
        if not (worker.request_limit or self.config.max_memory):
            return
        reason = should_recycle(
            worker.requests,
            worker.request_limit,
            worker.rss() if self.config.max_memory else 0,
            self.config.max_memory,
        )
        if reason is not None and not self._rolling.locked():
            self._recycle(worker, reason)

    def _recycle(self, worker: Worker, reason: str) -> None:
        if worker.recycling:
            return
        worker.recycling = reason
        assert self._nursery is not None
        self._nursery.start_soon(self._recycle_task, worker, reason)

    async def _recycle_task(self, worker: Worker, reason: str) -> None:
        async with self._rolling:
            if worker.state == "exited" or self._stopping or worker.slot.worker is not worker:
                return
            log.info("recycling worker %d (pid %d): %s", worker.id, worker.pid, reason)
            try:
                if await self._replace(worker.slot, reason):
                    self._count_respawn(reason)
            except ReloadError:
                if reason == "protocol error":
                    _kill(worker, signal.SIGKILL)
                    return
                worker.recycling = None
                worker.recycle_after = trio.current_time() + max(1.0, self.config.backoff_max)

    async def _disconnect(self, worker: Worker, reason: str) -> None:
        """Graceful disconnect: no more connections, finish in-flight work within
        graceful_timeout; SIGTERM past it plus a margin, then SIGKILL."""
        if worker.state == "exited":
            return
        worker.requested_disconnect = True  # even if it was already draining on its own
        tell = worker.state != "disconnecting"
        if tell:
            worker.state = "disconnecting"
            worker.requested_disconnect = True
            self._dispatcher.remove(worker)
            self._publish(HerdEvent("disconnect", worker.id, worker.pid, worker.slot.index))
            log.debug("disconnecting worker %d (pid %d): %s", worker.id, worker.pid, reason)
        with trio.move_on_after(self.config.graceful_timeout + KILL_MARGIN):
            # the send is inside the deadline: a worker too hung to read it is escalated
            # like one that does not finish
            if tell:
                with contextlib.suppress(_ipc.ChannelClosed, OSError):
                    grace = self.config.graceful_timeout
                    await worker.channel.send(_ipc.encode("disconnect", grace=grace))
            await worker.exited_event.wait()
            return
        log.warning("worker %d (pid %d) did not exit in time; SIGTERM", worker.id, worker.pid)
        _kill(worker, signal.SIGTERM)
        with trio.move_on_after(KILL_MARGIN):
            await worker.exited_event.wait()
            return
        log.warning("worker %d (pid %d) ignored SIGTERM; SIGKILL", worker.id, worker.pid)
        _kill(worker, signal.SIGKILL)
        await worker.exited_event.wait()

    # -- accepting and dispatching ---------------------------------------------------

    async def _accept_all(self) -> None:
        with self._accept_scope:
            async with trio.open_nursery() as nursery:
                for index, listener in enumerate(self.listeners):
                    nursery.start_soon(self._accept_loop, index, listener)

    async def _accept_loop(self, index: int, listener: Listener) -> None:
        """Accept raw fds until EAGAIN and pass them on in batches; stop accepting while
        every worker is full, so that the kernel backlog, not our memory, holds clients."""
        sock = listener.sock
        dispatcher = self._dispatcher
        pick = dispatcher.pick
        max_fds = _ipc.MAX_FDS
        message = self._conn_messages[index]
        while True:
            await trio.lowlevel.wait_readable(sock)
            drained = False
            while not drained:
                if not dispatcher.has_room():
                    await self._capacity.wait()
                    continue
                # no await from the first accept to the flush: every fd accepted here is
                # either handed over or closed, even if we are cancelled
                batches: dict[Worker, list[int]] = {}
                overflow: list[int] = []
                drained = True
                pause = False
                for _ in range(256):
                    fd, pause = accept_fd(sock)
                    if fd is None:
                        break
                    worker = pick()
                    if worker is None:  # every worker became full during this batch
                        overflow.append(fd)
                        drained = False
                        break
                    worker.dispatched += 1
                    fds = batches.setdefault(worker, [])
                    fds.append(fd)
                    if len(fds) == max_fds:  # a full packet: flush, then accept more
                        drained = False
                        break
                else:
                    drained = False  # 256 in a row: flush, then accept more
                await self._flush(batches, overflow, index, message)
                if pause:  # out of fds or memory: give the workers a moment
                    await trio.sleep(0.05)

    async def _flush(
        self,
        batches: dict[Worker, list[int]],
        overflow: list[int],
        index: int,
        message: bytes,
    ) -> None:
        pending = list(batches.items())
        try:
            while pending:
                worker, fds = pending[0]
                await self._send_fds(worker, fds, index, message)
                pending.pop(0)
        except BaseException:
            for _, fds in pending[1:]:
                _ipc.close_fds(fds)
            _ipc.close_fds(overflow)
            raise
        if overflow:
            await self._dispatch_fds(overflow, index)

    async def _send_fds(self, worker: Worker, fds: list[int], index: int, message: bytes) -> None:
        """Hand ``fds`` to ``worker`` (or, if it cannot take them, to another) and close
        our copies. Never waits on one worker: a worker that stopped reading its channel
        (hung, or far behind) must not stop the accept loop for all the others."""
        if self._offer(worker, message, fds):
            _ipc.close_fds(fds)
            return
        worker.dispatched -= len(fds)
        await self._dispatch_fds(fds, index)

    def _offer(self, worker: Worker, message: bytes, fds: list[int]) -> bool:
        """Pass fds at once if the worker's channel has room; else take the worker out of
        dispatch until it reads again (or for good if its channel is broken)."""
        try:
            if worker.channel.offer(message, fds):
                return True
        except (_ipc.ChannelClosed, OSError) as exc:
            log.warning("could not pass %d connections to worker %d: %s", len(fds), worker.id, exc)
            self._dispatcher.remove(worker)
            return False
        if worker in self._dispatcher:
            log.warning(
                "worker %d (pid %d) is not reading its channel; skipping it until it does",
                worker.id,
                worker.pid,
            )
            self._dispatcher.remove(worker)
            assert self._nursery is not None
            self._nursery.start_soon(self._readmit, worker)
        return False

    async def _readmit(self, worker: Worker) -> None:
        """Give a congested worker connections again once its channel has room."""
        with contextlib.suppress(_ipc.ChannelClosed, OSError, trio.ClosedResourceError):
            await worker.channel.wait_room()
        if worker.state == "ready" and worker.slot.active and not self._stopping:
            log.info("worker %d (pid %d) reads its channel again", worker.id, worker.pid)
            self._dispatcher.add(worker)
            self._signal_capacity()

    async def _dispatch_fds(self, fds: list[int], index: int) -> None:
        """Give fds that could not be delivered (or were refused) to another worker."""
        message = self._conn_messages[index % len(self._conn_messages)]
        try:
            while fds:
                worker = self._dispatcher.pick()
                if worker is None:
                    if self._stopping:
                        break
                    await self._capacity.wait()
                    continue
                worker.dispatched += len(fds)
                if self._offer(worker, message, fds):
                    break
                worker.dispatched -= len(fds)
        finally:
            _ipc.close_fds(fds)  # handed over (the worker has its own copies) or given up

    def _signal_capacity(self) -> None:
        """Wake everyone waiting for a worker with room (accept loops, re-dispatch, boot);
        later waiters wait on a fresh event."""
        self._capacity.set()
        self._capacity = trio.Event()

    # -- events ------------------------------------------------------------------------

    def _publish(self, event: HerdEvent) -> None:
        for channel in self._subscribers:
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._unsubscribe(channel)

    def _unsubscribe(self, channel: trio.MemorySendChannel[HerdEvent]) -> None:
        if channel in self._subscribers:
            self._subscribers.remove(channel)
            channel.close()

    def _notify(self, state: str) -> None:
        if self.on_state_change is not None:
            self.on_state_change(state)

    # -- aggregate counters (metrics, status) --------------------------------------------

    def totals(self) -> dict[str, Any]:
        totals = dict(self._exited_totals)
        status = dict(self._exited_status)
        for worker in self._workers:
            for key in ("requests", "bytes_in", "bytes_out"):
                totals[key] += int(worker.stats.get(key, 0))
            for key, count in dict(worker.stats.get("status", {})).items():
                status[key] = status.get(key, 0) + int(count)
        totals["status"] = status
        totals["connections"] = sum(w.open_connections for w in self._workers)
        return totals

    # -- the run ---------------------------------------------------------------------

    async def _boot(self) -> None:
        for index in range(self.config.workers):
            slot = Slot(index)
            self._slots.append(slot)
            self._spawn(slot)
        # ready when every slot has a ready worker, or the herd gave up
        while not self._stopping:
            if all(
                slot.worker is not None and slot.worker.state == "ready" for slot in self._slots
            ):
                return
            with trio.move_on_after(0.5):
                await self._capacity.wait()

    async def _handle_signals(self) -> None:
        assert self._nursery is not None
        signals = [signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGTTIN, signal.SIGTTOU]
        with trio.open_signal_receiver(*signals) as received:
            async for signum in received:
                name = signal.Signals(signum).name
                if signum in (signal.SIGINT, signal.SIGTERM):
                    if self._stopping:
                        log.warning("%s again: stopping now", name)
                        self.force_stop()
                    else:
                        log.info("%s: stopping gracefully (again to stop at once)", name)
                        self._nursery.start_soon(self.stop)
                elif signum == signal.SIGHUP:
                    self._nursery.start_soon(self._reload_logged)
                elif signum == signal.SIGTTIN:
                    self._nursery.start_soon(self.scale, self.size + 1)
                elif signum == signal.SIGTTOU and self.size > 1:
                    self._nursery.start_soon(self.scale, self.size - 1)

    async def _reload_logged(self) -> None:
        with contextlib.suppress(ReloadError):
            await self.reload()


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


async def _first(*events: trio.Event) -> None:
    """Wait until any of the events is set."""
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(event: trio.Event = event) -> None:
                await event.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)


def signal_name(number: int) -> str:
    """SIGKILL, SIGTERM, ... or 'signal 40' for one Python has no name for (realtime)."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _valid_stats(stats: dict[str, Any]) -> bool:
    """A worker's counters: whole numbers, and a status map of whole numbers."""
    for key in ("requests", "bytes_in", "bytes_out", "open", "refused"):
        value = stats.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            return False
    status = stats.get("status", {})
    return isinstance(status, dict) and all(
        isinstance(n, int) and not isinstance(n, bool) for n in status.values()
    )


def _kill(worker: Worker, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        if worker.process.poll() is None:
            worker.process.send_signal(signum)


async def _wait_process(process: subprocess.Popen[bytes]) -> None:
    """Wait for the process to exit without a thread: a pidfd is readable once it has."""
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


async def serve(
    config: Config,
    *,
    task_status: trio.TaskStatus[Herd] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a herd until it is stopped. ``await nursery.start(serve, config)`` returns the
    :class:`Herd` once every worker is ready. Raises WorkerBootError if workers keep dying
    before they become ready, ConfigError for a bad listener."""
    _tls.check(config)
    listeners = open_listeners(config)
    herd = Herd(config, listeners)
    extras: list[Any] = []
    started = False
    try:
        async with trio.open_nursery() as nursery:
            herd._nursery = nursery
            if config.control:
                from ._control import start_control_server

                extras.append(await start_control_server(herd, nursery))
            if config.handle_signals:
                nursery.start_soon(herd._handle_signals)
            if config.metrics_bind:  # before any worker: a busy port is a usage error
                from ._metrics import serve_metrics

                await nursery.start(serve_metrics, herd)
            await herd._boot()
            if not herd._stopping:
                if config.dispatch != "shared":
                    nursery.start_soon(herd._accept_all)
                herd._notify("ready")
                task_status.started(herd)
                started = True
            await herd._stopped.wait()
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True):
            for worker in list(herd._workers):
                worker.killed_for = worker.killed_for or "shutdown"
                _kill(worker, signal.SIGKILL)
            for worker in list(herd._workers):
                with trio.move_on_after(5):
                    await _wait_process(worker.process)
            for listener in listeners:
                listener.close()
            for extra in extras:
                extra.close()
            for channel in list(herd._subscribers):
                channel.close()
    if herd._fatal is not None:
        raise herd._fatal
    if not started:
        stopped = StoppedBeforeReady("the herd was stopped before every worker was ready")
        stopped.forced = herd.forced
        raise stopped
