"""What a worker is on any runtime: its init, its app, the connections it takes from the
primary and acknowledges, its counters and its boot messages. ``worker.main`` (Trio) and
``aio.worker`` (asyncio) add the event loop: the waits on the channels, the heartbeat, the
drain.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import sys
import traceback
from typing import Any, NoReturn

import attrs

from .. import _ipc
from .._config import Config
from .._errors import IPCProtocolError
from .._policy import recycle_threshold
from .._tally import Tally
from ..apps import loading as _app
from ..protocols.proxyproto import ForgedHeader, ProxyGate, ProxyProtocolError, Waits
from ..protocols.state import ServerState

log = logging.getLogger("trioherd.worker")

EXIT_BOOT_ERROR = 3
PRIMARY_GONE_GRACE = 1.0
"""The drain's grace when the primary is gone (it can give none)."""
DEMO_APPS = {False: "trioherd._demo:app", True: "trioherd._demo:asgi"}
"""What is served when no app is named: the native demo, or with ``--asyncio`` the same
demo as an ASGI app."""


@attrs.frozen
class WorkerInfo:
    """Who this worker is: ``id`` is unique per spawn, ``slot`` is its place in the herd
    (stable across respawns, like PM2's NODE_APP_INSTANCE)."""

    id: int
    slot: int
    pid: int


_info: list[WorkerInfo] = []  # this process's, once it is a worker


def current_worker() -> WorkerInfo | None:
    """In a worker: its id, slot and pid. In the primary or a plain program: None."""
    return _info[0] if _info else None


def set_parent_death_signal(expected_parent: int) -> None:
    """Die with the primary, even when it is SIGKILLed (Linux). The primary spawns workers
    from its main thread, whose death is what the kernel watches."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != expected_parent:  # died before prctl took effect
        os._exit(1)


def boot_failed(sock: socket.socket, text: str) -> NoReturn:
    """Tell the primary (over the channel socket ``sock``) why we cannot boot, and exit.
    The primary prints it (once, not once per worker); only if it cannot be told is it
    written here."""
    try:
        sock.setblocking(True)
        sock.send(_ipc.encode("boot_error", text=text[-60000:]))
    except OSError:
        sys.stderr.write(text if text.endswith("\n") else text + "\n")
        sys.stderr.flush()
    os._exit(EXIT_BOOT_ERROR)


def app_traceback(exc: BaseException) -> str:
    """The traceback of an app's error without trioherd's and importlib's frames above it."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        filename = tb.tb_frame.f_code.co_filename
        if not (
            filename.startswith(package)
            or filename.startswith("<frozen")
            or "importlib" in filename
        ):
            break
        tb = tb.tb_next
    return "".join(traceback.format_exception(type(exc), exc, tb))


def socket_addresses(sock: socket.socket) -> tuple[Any, Any] | None:
    """(client, server) addresses of a connection ((None, None) on a Unix socket); None if
    the client has gone already."""
    try:
        client: Any = sock.getpeername()
        server: Any = sock.getsockname()
    except OSError:
        return None
    if isinstance(client, tuple):
        return client[:2], server[:2]
    return None, None  # a Unix socket has no client address


def proxy_gate(state: ServerState, waits: Waits) -> ProxyGate | None:
    """With --proxy-protocol, the worker's judge of PROXY headers (a refusal is a cut,
    ``proxy_refused``); within --header-timeout a header must come, or the bytes that
    show there is none."""
    config = state.config
    if not config.proxy_protocol:
        return None

    def refused(peer: tuple[str, int]) -> None:
        state.cut("proxy_refused", peer)

    return ProxyGate(config.proxy_protocol_allow_ips, config.header_timeout, refused, waits)


async def client_addresses(sock: socket.socket, gate: ProxyGate | None) -> tuple[Any, Any] | None:
    """As :func:`socket_addresses`, but with --proxy-protocol the client is the one the
    PROXY header of an allowed peer names. None: close it."""
    found = socket_addresses(sock)
    if found is None or gate is None:
        return found
    client, server = found
    try:
        source = await gate.client(sock, client)
    except ForgedHeader:
        return None  # counted and logged as a cut
    except (ProxyProtocolError, TimeoutError, OSError) as exc:
        log.debug("closing a connection without a valid PROXY header: %s", exc or "timeout")
        return None
    return (source or client), server


def init_runtime(fd: int) -> str:
    """The runtime the init message waiting on channel ``fd`` asks for (``trio`` or
    ``asyncio``), read before any event loop runs; peeked, so it stays queued for the
    runtime to read (without its fds: a peek with no room for them leaves them queued)."""
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.setblocking(True)
        data = sock.recv(_ipc.MAX_PACKET, socket.MSG_PEEK)
        config = _ipc.decode(data).get("config") if data else None
    except (OSError, IPCProtocolError):
        return "trio"  # the runtime's own read reports it
    finally:
        sock.close()
    if not isinstance(config, dict) or not config.get("asyncio"):
        return "trio"
    # --loop trio-asyncio: an asyncio app in a Trio worker (worker.bridge)
    return "trio" if config.get("loop") == "trio-asyncio" else "asyncio"


def ready_message(interface: str) -> bytes:
    """The worker is ready. ``http``: its app's clients speak first (HTTP, or TLS and PROXY
    before it), so the primary may let the kernel defer accepts (``--defer-accept``)."""
    return _ipc.encode(
        "ready", v=_ipc.PROTOCOL_VERSION, pid=os.getpid(), http=interface != "stream"
    )


def read_init(sock: socket.socket) -> tuple[dict[str, Any], list[int], list[Any]]:
    """The init message from the primary, read before any event loop runs (it says which
    runtime the worker is): (the message, its fds, the packets that came after it). Exits
    if the primary sent none that is valid."""
    sock.setblocking(True)
    channel = _ipc.Channel(sock)  # non-blocking again: packets that followed are taken
    try:
        sock.setblocking(True)
        first = channel.receive_nowait()
        sock.setblocking(False)
        init = _ipc.decode(first[0])
        if init["t"] != "init" or init["v"] != _ipc.PROTOCOL_VERSION or not first[1]:
            raise IPCProtocolError(f"expected init v{_ipc.PROTOCOL_VERSION} with a tally")
    except (_ipc.ChannelClosed, IPCProtocolError, OSError) as exc:
        sys.stderr.write(f"trioherd worker: no valid init from the primary: {exc}\n")
        os._exit(1)
    early = []
    while True:
        try:
            early.append(channel.receive_nowait())
        except (BlockingIOError, _ipc.ChannelClosed):
            break
    return init, first[1], early


class WorkerBase:
    """A worker's state that no event loop owns (see the module docstring)."""

    def __init__(self, init: dict[str, Any], fds: list[int]) -> None:
        self.config = Config.from_wire(init["config"])
        self.worker_id: int = init["id"]
        self.slot: int = init["slot"]
        self.info = WorkerInfo(id=self.worker_id, slot=self.slot, pid=os.getpid())
        _info[:] = [self.info]
        self.state = ServerState(self.config, self.worker_id)
        tally_fd, *listener_fds = fds
        try:
            self.tally = Tally(tally_fd)
        finally:
            os.close(tally_fd)
        self.listeners = [socket.socket(fileno=fd) for fd in listener_fds]
        for listener in self.listeners:
            listener.setblocking(False)
        # the address family of each of the primary's listeners, by index
        self.families: list[int] = list(init.get("families") or [socket.AF_INET])
        self.ssl_context: Any = None
        self.ticket_keys: object = init.get("tickets")  # hex: the herd's TLS ticket keys
        # near and at this many requests the primary recycles us: tell it at once, not at
        # the next heartbeat
        self.request_limit = int(init.get("limit", 0))
        if self.request_limit:
            self.state.on_request = self.check_limit
        self.draining = False
        self.grace = 0.0
        self.drain_deadline = 0.0

    def beat_soon(self) -> None:
        """Send the next heartbeat now (the runtime's)."""
        raise NotImplementedError

    def connection_closed(self) -> None:
        """A connection is over (the runtime's: counted in the tally, and who waits for
        room or for the end is told)."""
        raise NotImplementedError

    def messages(self, batch: list[tuple[bytes, list[int]]]) -> list[dict[str, Any]]:
        """The primary's messages in a batch from the control channel: any fds closed
        (only the connection channel carries fds), a packet that does not decode logged
        and left out."""
        found = []
        for data, fds in batch:
            _ipc.close_fds(fds)
            try:
                found.append(_ipc.decode(data))
            except IPCProtocolError as exc:
                log.error("bad message from primary: %s", exc)
        return found

    def drain_starts(self, grace: float | None, now: float) -> bool:
        """Whether a drain starts now (False: one is under way already): its grace (the
        primary's; PRIMARY_GONE_GRACE when it is gone) and deadline are set, and the
        connections told (``Connection: close`` from now on, idle ones close soon)."""
        if self.draining:
            return False
        self.draining = True
        self.grace = PRIMARY_GONE_GRACE if grace is None else grace
        self.drain_deadline = now + self.grace
        self.state.start_draining()
        return True

    def adopt(self, fd: int, family: int) -> socket.socket | None:
        """A connection's fd as a socket, counted open in the tally; None if it cannot be
        (then it is closed and counted closed)."""
        self.tally.count_open()
        try:
            # naming the family spares the three getsockopt calls of a bare fileno=
            return socket.socket(family, socket.SOCK_STREAM, 0, fileno=fd)
        except OSError:
            _ipc.close_fds([fd])
            self.connection_closed()
            return None

    def check_limit(self) -> None:
        served = self.state.stats.requests
        if served == recycle_threshold(self.request_limit):
            self.beat_soon()  # the primary starts our successor
        if served == self.request_limit:
            self.beat_soon()  # the primary sends us no more connections
            self.state.start_draining()  # and open ones get Connection: close

    def load(self) -> tuple[Any, str]:
        """The app and its interface; the TLS context with the herd's ticket keys."""
        spec = self.config.app or DEMO_APPS[self.config.asyncio]
        app = _app.load(spec)
        interface = _app.detect_interface(app, self.config.interface)
        if self.config.tls:
            from .._tls import server_context, share_ticket_keys

            self.ssl_context = server_context(self.config)
            if not self.config.ssl_context_factory:  # a factory's context is used as it is
                share_ticket_keys(self.ssl_context, self.ticket_keys)
        return app, interface

    @property
    def open(self) -> int:
        """Connections open now (the tally counts them, for the primary too)."""
        return self.tally.open

    def stats(self) -> dict[str, Any]:
        stats = self.state.stats.snapshot()
        stats["open"] = self.open
        return stats

    def unpack(self, batch: list[tuple[bytes, list[int]]]) -> tuple[list[tuple[int, int]], bool]:
        """Acknowledge a batch of connection packets (in the tally the primary reads)
        before a byte of them is read: ((fd, family) to serve, whether the end marker was
        among them)."""
        taken: list[tuple[int, int]] = []
        last = 0
        end = False
        try:
            for data, fds in batch:
                try:
                    listener, seq = _ipc.decode_conn(data)
                except IPCProtocolError as exc:
                    log.error("%s", exc)
                    _ipc.close_fds(fds)
                    continue
                if listener == _ipc.END_OF_CONNS:
                    end = True
                    _ipc.close_fds(fds)
                    continue
                family = self.families[listener % len(self.families)]
                taken.extend((fd, family) for fd in fds)
                last = max(last, seq)
            if last:  # the primary keeps its copies until then
                self.tally.taken = last
        except BaseException:
            _ipc.close_fds([fd for fd, _ in taken])
            raise
        return taken, end
