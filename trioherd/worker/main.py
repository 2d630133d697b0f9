"""The worker process, started as ``python -c "import trioherd.worker.main as w; w.main()" --fd N
--conn-fd M --ppid P`` (not ``-m``, which would run this module a second time as
``__main__`` and give the app a different ``current_worker()``).

Boot: set PR_SET_PDEATHSIG, read the init message (config, id) from the channel, import
the app (a failure is reported to the primary as ``boot_error`` with the traceback, then
exit 3), run ASGI lifespan startup, then say ``ready``.

Serve: every packet of the connection channel brings up to 16 accepted fds; the worker
acknowledges what it took (in its tally, memory shared with the primary: ``_tally``)
before it reads a byte of them, then each becomes a connection task in the connection
nursery, over a raw non-blocking socket for plain HTTP (TCP_NODELAY comes from the
listening socket), a trio SocketStream for TLS and stream handlers. With the ``shared``
policy the worker accepts on the listening sockets it was given instead. Heartbeats with
counters go to the primary from this event loop, so a blocked loop stops them; the tally
also counts connections opened and closed, which the primary reads when it dispatches.

Drain: on ``disconnect``, or SIGTERM (then the worker says ``draining`` first), or EOF on
the channel (the primary died): responses carry ``Connection: close``, idle keep-alive
connections close after a short grace, connections still queued for this worker are
served until the primary's end marker, and whatever is left when the grace runs out is
cancelled. Then ASGI lifespan shutdown and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import trio

from .. import _ipc
from .._config import Config, http_parser
from .._errors import ConfigError, IPCProtocolError
from .._listeners import accept_fd
from .._log import capture_output, setup_logging
from ..apps.asgi import ASGIAdapter
from ..apps.native import NativeAdapter
from ..protocols.http1 import Adapter, HTTPConnection
from ..protocols.rawstream import EdgeWaiter, RawSocketStream, TrioWaits
from ..protocols.state import ServerState
from . import aio as _aio
from . import bridge as _bridge
from .base import (
    EXIT_BOOT_ERROR,
    WorkerBase,
    WorkerInfo,
    app_traceback,
    boot_failed,
    client_addresses,
    current_worker,
    init_runtime,
    proxy_gate,
    ready_message,
    set_parent_death_signal,
    socket_addresses,
)

__all__ = ["EXIT_BOOT_ERROR", "WorkerInfo", "app_traceback", "current_worker", "main"]

log = logging.getLogger("trioherd.worker")


Handler = Callable[[socket.socket], Awaitable[None]]
"""What each accepted socket is given to (see _make_handler)."""


_current: Worker | None = None


async def send_to_primary(obj: Any) -> None:
    """Send a JSON-serialisable object to the primary (``herd.messages()`` yields it)."""
    if _current is None:
        raise RuntimeError("send_to_primary() is only available inside a trioherd worker")
    packet = _ipc.encode("msg", data=obj)
    if len(packet) > _ipc.MAX_MESSAGE:
        raise ValueError(f"message of {len(packet)} bytes is over {_ipc.MAX_MESSAGE}")
    await _current.channel.send(packet)


async def receive_from_primary() -> Any:
    """In a worker: the next object the primary sent with ``herd.broadcast()``."""
    if _current is None:
        raise RuntimeError("receive_from_primary() is only available inside a trioherd worker")
    return await _current.inbox_receive.receive()


class Worker(WorkerBase):
    """A worker on Trio (``worker.base.WorkerBase`` with Trio's waits)."""

    def __init__(
        self,
        channel: _ipc.Channel,
        conns: _ipc.Channel,
        init: dict[str, Any],
        fds: list[int],
    ) -> None:
        super().__init__(init, fds)
        self.channel = channel
        self.conns = conns
        self.closed_event = trio.Event()  # the shared accept loop waits on it when full
        self.idle = trio.Event()
        self.idle.set()
        self.drain_started = trio.Event()
        self.conns_done = trio.Event()  # the end marker came: no connection follows
        self.inbox_send, self.inbox_receive = trio.open_memory_channel[Any](100)
        self.handler: Handler | None = None
        self.conn_nursery: trio.Nursery | None = None
        self.early: list[tuple[bytes, list[int]]] = []
        self.beat_now = trio.Event()

    def beat_soon(self) -> None:
        self.beat_now.set()

    # -- connections -------------------------------------------------------------------

    def start_connection(self, fd: int, family: int) -> None:
        assert self.conn_nursery is not None
        sock = self.adopt(fd, family)
        if sock is None:
            return
        self.idle = trio.Event() if self.idle.is_set() else self.idle
        self.conn_nursery.start_soon(self.run_connection, sock)

    async def run_connection(self, sock: socket.socket) -> None:
        try:
            assert self.handler is not None
            await self.handler(sock)
        except Exception:
            log.exception("connection handler failed")
        finally:
            sock.close()
            self.connection_closed()
            if self.open == 0:
                self.idle.set()

    def connection_closed(self) -> None:
        self.tally.count_close()  # the primary reads it: no message
        self.closed_event.set()

    async def heartbeat(self) -> None:
        interval = min(1.0, self.config.worker_timeout / 4)
        while True:
            await self.channel.send(_ipc.encode("beat", stats=self.stats()))
            with trio.move_on_after(interval):
                await self.beat_now.wait()
            self.beat_now = trio.Event()

    async def accept_loop(self, listener: socket.socket) -> None:
        """``shared`` policy: accept on the listening socket until full or draining."""
        limit = self.config.max_connections
        family = listener.family  # an enum made anew on every read
        while not self.draining:
            if self.open >= limit:
                if self.closed_event.is_set():  # an old close (nobody resets it here)
                    self.closed_event = trio.Event()
                await self.closed_event.wait()
                continue
            await trio.lowlevel.wait_readable(listener)
            while self.open < limit and not self.draining:
                fd, pause = accept_fd(listener)
                if fd is None:
                    if pause:
                        await trio.sleep(0.05)
                    break
                self.start_connection(fd, family)

    # -- the channel -------------------------------------------------------------------

    async def read_conns(self) -> None:
        """Take the connections the primary passes until its end marker (or its end)."""
        try:
            while True:
                try:
                    batch = await self.conns.receive_batch()
                except _ipc.ChannelClosed:
                    return
                except IPCProtocolError as exc:  # truncated: the channel cannot be trusted
                    log.error("bad connection packet from the primary (%s); draining", exc)
                    await self.begin_drain(self.config.graceful_timeout, announce=True)
                    return
                if self.take(batch):
                    return
        finally:
            self.conns_done.set()

    def take(self, batch: list[tuple[bytes, list[int]]]) -> bool:
        """Acknowledge a batch of connection packets (in the tally the primary reads),
        then start serving them. True if the end marker was among them."""
        taken, end = self.unpack(batch)
        for fd, family in taken:
            self.start_connection(fd, family)
        return end

    async def read_channel(self) -> None:
        """Handle messages from the primary until it goes away."""
        channel = self.channel
        while True:
            try:
                batch, self.early = self.early or await channel.receive_batch(), []
            except _ipc.ChannelClosed:
                log.warning("primary went away; stopping")
                await self.begin_drain()
                return
            for message in self.messages(batch):
                kind = message["t"]
                if kind == "disconnect":
                    await self.begin_drain(float(message["grace"]))
                elif kind == "msg":
                    try:
                        self.inbox_send.send_nowait(message["data"])
                    except trio.WouldBlock:
                        log.warning("inbox full: dropped a message from the primary")

    async def begin_drain(self, grace: float | None = None, announce: bool = False) -> None:
        """Finish the open connections, and the ones still queued for us, within
        ``grace``. ``announce``: the drain is our own idea (SIGTERM), so tell the
        primary, which stops passing connections and queues its end marker."""
        if not self.drain_starts(grace, trio.current_time()):
            return
        for listener in self.listeners:
            trio.lowlevel.notify_closing(listener)
            listener.close()
        self.drain_started.set()
        if announce:
            with contextlib.suppress(_ipc.ChannelClosed, OSError):
                await self.channel.send(_ipc.encode("draining"))

    async def serve(
        self,
        ready: Callable[[], Awaitable[None]],
        drained: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Serve until drained; then ``drained()`` (ASGI lifespan shutdown) runs while the
        heartbeat still does, so the primary's watchdog does not take it for a hang."""
        async with trio.open_nursery() as root:
            async with trio.open_nursery() as conns:
                self.conn_nursery = conns
                for listener in self.listeners:
                    conns.start_soon(self._accept_guarded, listener)
                # in the connection nursery: once the drain's deadline cancels it, no batch
                # is taken any more, and what is still queued goes back to the primary
                conns.start_soon(self.read_conns)
                root.start_soon(self.heartbeat)
                await root.start(self.drain_on_sigterm)
                root.start_soon(self.state.sweep)
                self.state.edge = EdgeWaiter()
                root.start_soon(self.state.edge.run)
                await ready()
                await self.read_channel_until_drain(conns)
            # connections are done (or were cancelled at the deadline): last words, so no
            # served request goes uncounted (the tally already holds every close)
            with contextlib.suppress(_ipc.ChannelClosed, OSError):
                await self.channel.send(_ipc.encode("beat", stats=self.stats()))
            if drained is not None:
                await drained()
            root.cancel_scope.cancel()

    async def drain_on_sigterm(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """SIGTERM sent to a worker (by a person, or a tool): drain gracefully, like a
        disconnect. The primary escalates to SIGKILL if that takes too long."""
        with trio.open_signal_receiver(signal.SIGTERM) as signals:
            task_status.started()  # before ready: a SIGTERM right after it must not kill
            async for _ in signals:
                log.info("SIGTERM: draining")
                await self.begin_drain(self.config.graceful_timeout, announce=True)

    async def _accept_guarded(self, listener: socket.socket) -> None:
        try:
            await self.accept_loop(listener)
        except (OSError, trio.ClosedResourceError):
            if not self.draining:
                raise

    async def read_channel_until_drain(self, conns: trio.Nursery) -> None:
        async with trio.open_nursery() as inner:
            inner.start_soon(self.read_channel)
            await self.drain_started.wait()
            conns.cancel_scope.deadline = self.drain_deadline
            with trio.move_on_at(self.drain_deadline):
                await self.conns_done.wait()  # serve what was queued for us, then
                await self.idle.wait()  # finish what is open
            conns.cancel_scope.cancel()
            inner.cancel_scope.cancel()


def _boot_failed(channel: _ipc.Channel, text: str) -> NoReturn:
    boot_failed(channel.sock, text)


async def _main(fd: int, conn_fd: int) -> None:
    global _current
    channel = _ipc.Channel(socket.socket(fileno=fd))
    conns = _ipc.Channel(socket.socket(fileno=conn_fd))
    try:
        batch = await channel.receive_batch()
        init = _ipc.decode(batch[0][0])
        fds = batch[0][1]
        if init["t"] != "init" or init["v"] != _ipc.PROTOCOL_VERSION or not fds:
            raise IPCProtocolError(f"expected init v{_ipc.PROTOCOL_VERSION} with a tally")
    except (_ipc.ChannelClosed, IPCProtocolError) as exc:
        sys.stderr.write(f"trioherd worker: no valid init from the primary: {exc}\n")
        os._exit(1)
    worker = Worker(channel, conns, init, fds)
    worker.early = batch[1:]  # e.g. a disconnect sent right after the init
    _current = worker
    config = worker.config
    handler = setup_logging(
        config.log_level, f"w{worker.info.id}", config.log_format, worker.info.id
    )
    capture_output(worker.info.id, config.log_format)  # what the app prints: tagged lines
    if not config.asyncio:
        handler.addFilter(_aio.AsyncioHint())
    if worker.config.access_log:  # asked for explicitly: not silenced by --log-level
        logging.getLogger("trioherd.access").setLevel(logging.INFO)
    try:
        app, interface = worker.load()
        if _bridge.wanted(config):  # an asyncio app in a trio-asyncio loop
            app = _bridge.wrap(app, interface)
    except ConfigError as exc:  # e.g. certificate files that broke since the primary checked
        _boot_failed(channel, f"trioherd: error: {exc}")
    except BaseException as exc:
        _boot_failed(channel, _aio.with_hint(app_traceback(exc), config))

    async with _bridge.loop(config), trio.open_nursery() as nursery:
        lifespan = None
        if interface == "asgi":
            from ..apps.lifespan import Lifespan

            lifespan = Lifespan(app, worker.state.asgi_state)
            error = await lifespan.startup(nursery)
            if error is not None:
                _boot_failed(channel, _aio.with_hint(error, config))
        worker.handler = _make_handler(worker, app, interface)

        async def ready() -> None:
            await channel.send(ready_message(interface))

        async def shutdown() -> None:
            assert lifespan is not None
            # what is left of the grace, plus a second: the primary's SIGTERM comes at
            # grace + KILL_MARGIN (2 s) after it asked us to disconnect
            with trio.move_on_at(max(worker.drain_deadline, trio.current_time()) + 1.0):
                await lifespan.shutdown()

        await worker.serve(ready, shutdown if lifespan is not None else None)
        nursery.cancel_scope.cancel()
    channel.close()
    conns.close()


def _make_handler(worker: Worker, app: Any, interface: str) -> Handler:
    """The coroutine each accepted socket is given to, for the app's interface."""
    config = worker.config
    if interface == "stream":
        return _stream_handler(app, worker.ssl_context, worker.state)
    adapter = _adapter(app, interface, worker.state)
    connection = _connection_class(config)
    if worker.ssl_context is not None:
        return _tls_handler(worker.state, adapter, worker.ssl_context, connection)
    return _plain_handler(worker.state, adapter, connection)


def _connection_class(config: Config) -> type[HTTPConnection]:
    """The request parser (``--http``), chosen once per worker."""
    if http_parser(config) == "httptools":
        from ..protocols.httptools import HttptoolsConnection

        return HttptoolsConnection
    return HTTPConnection


def _adapter(app: Any, interface: str, state: ServerState) -> Adapter:
    """The app's HTTP interface, chosen once per worker."""
    if interface == "asgi":
        return ASGIAdapter(app, state.asgi_state)
    if interface == "wsgi":  # its threads and streams, loaded only for a WSGI app
        from ..apps.wsgi import WSGIAdapter

        return WSGIAdapter(app, state)
    return NativeAdapter(app)


def _stream_handler(app: Any, ssl_context: Any, state: ServerState) -> Handler:
    """A raw stream handler: the app gets the stream (after the TLS handshake, if any)."""
    config = state.config
    gate = proxy_gate(state, TrioWaits())

    async def handle_stream(sock: socket.socket) -> None:
        if await client_addresses(sock, gate) is None:
            return
        plain = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        stream: trio.abc.Stream = plain
        try:
            if ssl_context is not None:
                from .._tls import handshake

                secured = await handshake(plain, ssl_context, config.tls_handshake_timeout)
                if secured is None:
                    return
                stream = secured[0]
            await app(stream)
        finally:
            await trio.aclose_forcefully(stream)

    return handle_stream


def _tls_handler(
    state: ServerState, adapter: Adapter, ssl_context: Any, connection: type[HTTPConnection]
) -> Handler:
    """HTTPS: the TLS handshake in the connection's task, then HTTP over TLS on the raw
    socket (``protocols.tlsstream``), which the connection drives like a plain one."""
    from .._tls import secure

    gate = proxy_gate(state, TrioWaits())

    async def handle_tls(sock: socket.socket) -> None:
        addresses = await client_addresses(sock, gate)  # a PROXY header comes before TLS
        if addresses is None:
            return
        secured = await secure(sock, ssl_context, state)
        if secured is None:
            return
        stream, tls = secured
        await connection(state, adapter, stream, *addresses, "https", tls).run()

    return handle_tls


def _plain_handler(
    state: ServerState, adapter: Adapter, connection: type[HTTPConnection]
) -> Handler:
    """Plain HTTP over a raw non-blocking socket (see ``protocols.rawstream``)."""
    gate = proxy_gate(state, TrioWaits())

    async def handle(sock: socket.socket) -> None:
        # (no coroutine for the addresses without a PROXY header to read: one per
        # connection is measurable)
        if gate is not None:
            addresses = await client_addresses(sock, gate)
        else:
            addresses = socket_addresses(sock)
        if addresses is None:
            return
        # the primary's listeners have TCP_NODELAY: accepted sockets inherit it
        stream = RawSocketStream(sock, nodelay=False, waiter=state.edge)
        await connection(state, adapter, stream, *addresses).run()

    return handle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trioherd.worker.main")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--conn-fd", type=int, required=True)
    parser.add_argument("--ppid", type=int, required=True)
    args = parser.parse_args(argv)
    set_parent_death_signal(args.ppid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the primary's to handle
    run(args.fd, args.conn_fd)


def run(fd: int, conn_fd: int) -> None:
    """Run the worker whose channel ends are ``fd`` and ``conn_fd`` on the runtime its
    init asks for: Trio, or asyncio's loop (``--asyncio``: ``aio.worker``)."""
    if init_runtime(fd) == "asyncio":
        from ..aio.worker import main as asyncio_main

        asyncio_main(fd, conn_fd)
        return
    trio.run(_main, fd, conn_fd)
