"""The asyncio runtime (``--asyncio``): a worker whose event loop is asyncio's own (uvloop's
with ``--loop uvloop``, or ``auto`` when it is installed), for ASGI apps that need one.

One loop for the worker's whole life: the app is imported in it, lifespan runs in it and
every request too, so what the app makes at startup (pools, locks, queues, tasks) works
in every request. The worker speaks to the primary exactly as a Trio worker does (the
same channels, init, acknowledgements in the tally, heartbeats, drain, end marker): the
primary cannot tell them apart.

Connections: each batch of fds from the primary is acknowledged in the tally before a
byte of them is read, then each gets a task that serves it with the HTTP/1.1 driver of
``protocols.h1driver`` over an asyncio transport (``aio.connection``). Heartbeats come
from this loop, so an app that blocks it stops them and the primary recalls its queued
connections and recycles it, as on Trio. The sweeper enforces every deadline.

Drain (``disconnect``, SIGTERM, or the primary's end): responses carry ``Connection:
close``, idle keep-alive connections close after a short grace, connections still queued
for this worker are served until the primary's end marker, and what is left when the
grace runs out is cancelled. Then lifespan shutdown, a last heartbeat, and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Callable
from typing import Any

from .. import _ipc
from .._errors import ConfigError, IPCProtocolError
from .._listeners import accept_fd
from .._log import capture_output, setup_logging
from ..apps.asgi import ASGIAdapter
from ..apps.lifespan import Lifespan
from ..worker.base import (
    WorkerBase,
    app_traceback,
    boot_failed,
    client_addresses,
    proxy_gate,
    read_init,
    ready_message,
    socket_addresses,
)
from .connection import AioConnection, AioWaits, connection_class, serve_connection

log = logging.getLogger("trioherd.worker")

ACCEPT_PAUSE = 0.05  # after an accept error that passes (out of fds)


class AioWorker(WorkerBase):
    """One worker on an asyncio loop (see the module docstring)."""

    def __init__(
        self,
        channel: socket.socket,
        conns: socket.socket,
        init: dict[str, Any],
        fds: list[int],
        early: list[tuple[bytes, list[int]]],
    ) -> None:
        super().__init__(init, fds)
        self.loop = asyncio.get_running_loop()
        self.channel = _ipc.Channel(channel)
        self.conns = _ipc.Channel(conns)
        self.early = early  # packets that came with the init (a disconnect, say)
        self.state.now = self.loop.time
        self.tasks: set[asyncio.Task[None]] = set()
        self.idle = asyncio.Event()
        self.idle.set()
        self.drain_started = asyncio.Event()
        self.conns_done = asyncio.Event()
        self.beat_now = asyncio.Event()
        self.send_lock = asyncio.Lock()
        self.accepting: set[socket.socket] = set()  # listeners with a reader (shared)
        self.adapter: Any = None
        self.connection: type[AioConnection] = AioConnection
        self.gate = proxy_gate(self.state, AioWaits())

    def beat_soon(self) -> None:
        self.beat_now.set()

    # -- the channels ------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """One message to the primary, in order."""
        if not self.send_lock.locked() and self.channel.offer(data):
            return
        async with self.send_lock:
            while not self.channel.try_send(data):
                writable = self.loop.create_future()
                fd = self.channel.sock.fileno()
                self.loop.add_writer(fd, writable.set_result, None)
                try:
                    await writable
                finally:
                    self.loop.remove_writer(fd)

    def read_packets(self, channel: _ipc.Channel) -> tuple[list[tuple[bytes, list[int]]], bool]:
        """The packets queued on ``channel`` now, and whether it has ended."""
        batch: list[tuple[bytes, list[int]]] = []
        while len(batch) < 256:
            try:
                batch.append(channel.receive_nowait())
            except BlockingIOError:
                return batch, False
            except (_ipc.ChannelClosed, OSError):
                return batch, True
        return batch, False

    def on_conns(self) -> None:
        """The connection channel is readable: acknowledge and serve what came."""
        try:
            batch, ended = self.read_packets(self.conns)
        except IPCProtocolError as exc:  # truncated: the channel cannot be trusted
            log.error("bad connection packet from the primary (%s); draining", exc)
            self.stop_taking()
            self.spawn(self.begin_drain(self.config.graceful_timeout, announce=True))
            return
        if batch:
            taken, end = self.unpack(batch)
            for fd, family in taken:
                self.start_connection(fd, family)
            ended = ended or end
        if ended:
            self.stop_taking()

    def stop_taking(self) -> None:
        """No more connections from the primary: what is still queued goes back to it."""
        with contextlib.suppress(ValueError, OSError):
            self.loop.remove_reader(self.conns.sock.fileno())
        self.conns_done.set()

    def on_channel(self) -> None:
        """A message from the primary (or its end)."""
        try:
            batch, ended = self.read_packets(self.channel)
        except IPCProtocolError as exc:
            log.error("bad message from primary: %s", exc)
            return
        self.handle(batch)
        if ended:
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(self.channel.sock.fileno())
            log.warning("primary went away; stopping")
            self.spawn(self.begin_drain())

    def handle(self, batch: list[tuple[bytes, list[int]]]) -> None:
        for message in self.messages(batch):
            if message["t"] == "disconnect":
                self.spawn(self.begin_drain(float(message["grace"])))
            elif message["t"] == "msg":
                log.debug("a broadcast from the primary: not delivered on asyncio")

    def spawn(self, coroutine: Any) -> None:
        task = self.loop.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- connections -------------------------------------------------------------------

    def start_connection(self, fd: int, family: int) -> None:
        sock = self.adopt(fd, family)
        if sock is None:
            return
        self.idle.clear()
        task = self.loop.create_task(self.run_connection(sock))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def run_connection(self, sock: socket.socket) -> None:
        try:
            if self.gate is None:
                addresses = socket_addresses(sock)
            else:  # a PROXY header comes before anything else (TLS too)
                addresses = await client_addresses(sock, self.gate)
            if addresses is not None:
                await serve_connection(
                    sock, addresses, self.state, self.adapter, self.connection, self.ssl_context
                )
        except Exception:
            log.exception("connection handler failed")
        finally:
            sock.close()
            self.connection_closed()

    def connection_closed(self) -> None:
        self.tally.count_close()  # the primary reads it: no message
        if self.open == 0:
            self.idle.set()
        if not self.draining:
            for listener in self.listeners:
                if listener not in self.accepting and self.open < self.config.max_connections:
                    self.accept_from(listener)

    def accept_from(self, listener: socket.socket) -> None:
        self.accepting.add(listener)
        self.loop.add_reader(listener.fileno(), self.on_accept, listener)

    def on_accept(self, listener: socket.socket) -> None:
        """``shared`` policy: accept on the listening socket until full or draining."""
        limit = self.config.max_connections
        family = listener.family
        while self.open < limit and not self.draining:
            fd, pause = accept_fd(listener)
            if fd is None:
                if pause:
                    self.pause_accepting(listener)
                    self.loop.call_later(ACCEPT_PAUSE, self.connection_closed)
                return
            self.start_connection(fd, family)
        self.pause_accepting(listener)  # full: a close starts it again

    def pause_accepting(self, listener: socket.socket) -> None:
        if listener in self.accepting:
            self.accepting.discard(listener)
            with contextlib.suppress(ValueError, OSError):
                self.loop.remove_reader(listener.fileno())

    # -- heartbeat, deadlines, drain --------------------------------------------------

    async def heartbeat(self) -> None:
        interval = min(1.0, self.config.worker_timeout / 4)
        while True:
            await self.send(_ipc.encode("beat", stats=self.stats()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(interval):
                    await self.beat_now.wait()
            self.beat_now.clear()

    async def sweep(self) -> None:
        state = self.state
        while True:
            await asyncio.sleep(state.sweep_interval)
            state.sweep_once(self.loop.time())

    async def begin_drain(self, grace: float | None = None, announce: bool = False) -> None:
        """Finish the open connections, and the ones still queued for us, within
        ``grace``. ``announce``: the drain is our own idea (SIGTERM), so tell the
        primary, which stops passing connections and queues its end marker."""
        if not self.drain_starts(grace, self.loop.time()):
            return
        for listener in self.listeners:
            self.pause_accepting(listener)
            listener.close()
        self.drain_started.set()
        if announce:
            with contextlib.suppress(_ipc.ChannelClosed, OSError):
                await self.send(_ipc.encode("draining"))

    def on_sigterm(self) -> None:
        """SIGTERM sent to a worker (by a person, or a tool): drain gracefully, like a
        disconnect. The primary escalates to SIGKILL if that takes too long."""
        log.info("SIGTERM: draining")
        self.spawn(self.begin_drain(self.config.graceful_timeout, announce=True))

    async def serve(self, ready: bytes, drained: Callable[[], Any] | None) -> None:
        """Serve until drained; then ``drained()`` (lifespan shutdown) runs while the
        heartbeat still does, so the primary's watchdog does not take it for a hang."""
        loop = self.loop
        loop.add_signal_handler(signal.SIGTERM, self.on_sigterm)
        loop.add_reader(self.conns.sock.fileno(), self.on_conns)
        loop.add_reader(self.channel.sock.fileno(), self.on_channel)
        for listener in self.listeners:
            self.accept_from(listener)
        beat = loop.create_task(self.heartbeat())
        sweeper = loop.create_task(self.sweep())
        self.handle(self.early)
        await self.send(ready)
        await self.drain_started.wait()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(self.drain_deadline):
                await self.conns_done.wait()  # serve what was queued for us, then
                await self.idle.wait()  # finish what is open
        self.stop_taking()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        # last words, so no served request goes uncounted (the tally holds every close)
        with contextlib.suppress(_ipc.ChannelClosed, OSError):
            await self.send(_ipc.encode("beat", stats=self.stats()))
        if drained is not None:
            await drained()
        beat.cancel()
        sweeper.cancel()
        await asyncio.gather(beat, sweeper, return_exceptions=True)
        loop.remove_signal_handler(signal.SIGTERM)
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(self.channel.sock.fileno())


def adapter_for(worker: AioWorker, app: Any, interface: str) -> ASGIAdapter:
    """The app's interface on asyncio: ASGI only (a native or stream handler is a Trio
    program; a WSGI app needs no event loop of its own)."""
    if interface != "asgi":
        raise ConfigError("asyncio", f"runs ASGI apps only (this app is a {interface} app)")
    return ASGIAdapter(app, worker.state.asgi_state, websockets=False)


class _Starter:
    """What lifespan starts the app's task with (a nursery's ``start_soon``, on asyncio):
    the task lives as long as the worker."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []

    def start_soon(self, function: Callable[[], Any]) -> None:
        self.tasks.append(asyncio.get_running_loop().create_task(function()))


async def _main(
    channel: socket.socket,
    conns: socket.socket,
    init: dict[str, Any],
    fds: list[int],
    early: list[tuple[bytes, list[int]]],
) -> None:
    worker = AioWorker(channel, conns, init, fds, early)
    config = worker.config
    setup_logging(config.log_level, f"w{worker.worker_id}", config.log_format, worker.worker_id)
    capture_output(worker.worker_id, config.log_format)  # what the app prints: tagged lines
    if config.access_log:  # asked for explicitly: not silenced by --log-level
        logging.getLogger("trioherd.access").setLevel(logging.INFO)
    try:
        app, interface = worker.load()
        worker.adapter = adapter_for(worker, app, interface)
    except ConfigError as exc:
        boot_failed(channel, f"trioherd: error: {exc}")
    except BaseException as exc:
        boot_failed(channel, app_traceback(exc))
    worker.connection = connection_class(config)
    lifespan = Lifespan(app, worker.state.asgi_state, event=asyncio.Event)
    starter = _Starter()
    error = await lifespan.startup(starter)
    if error is not None:
        boot_failed(channel, error)

    async def shutdown() -> None:
        # what is left of the grace, plus a second: the primary's SIGTERM comes at
        # grace + KILL_MARGIN (2 s) after it asked us to disconnect
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(max(worker.drain_deadline, worker.loop.time()) + 1.0):
                await lifespan.shutdown()

    await worker.serve(ready_message(interface), shutdown)
    for task in starter.tasks:
        task.cancel()
    await asyncio.gather(*starter.tasks, return_exceptions=True)
    channel.close()
    conns.close()


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``--loop`` names: uvloop's (``auto`` when it is installed) or
    asyncio's own (None: the default). ``uvloop`` without uvloop installed is an error."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError(
                "loop", "uvloop is not installed: pip install 'trioherd[asyncio]'"
            ) from None
        return None
    return uvloop.new_event_loop


def main(channel_fd: int, conns_fd: int) -> None:
    """Run the worker whose channel ends are these fds (``worker.main`` calls it when
    the init asks for the asyncio runtime)."""
    channel = socket.socket(fileno=channel_fd)
    init, fds, early = read_init(channel)
    conns = socket.socket(fileno=conns_fd)
    choice = str(init["config"].get("loop") or "auto")
    try:
        factory = loop_factory(choice)
    except ConfigError as exc:
        boot_failed(channel, f"trioherd: error: {exc}")
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(_main(channel, conns, init, fds, early))
