"""The channel between the primary and one worker.

An AF_UNIX SOCK_SEQPACKET socket pair: the kernel keeps message boundaries, so one packet
is one message, and any fds ride with the message that announces them (SCM_RIGHTS).

The framing is sans-IO (:func:`encode`, :func:`decode`): a message is a JSON object with a
``"t"`` naming its type. Both sides check the protocol version in the init/ready handshake.
:func:`decode` checks every field a type needs and raises :class:`IPCProtocolError` on
anything else, so a peer sending garbage is a logged, recycled worker, never a crash.

:class:`Channel` moves packets with raw non-blocking ``sendmsg``/``recvmsg`` calls and
trio's ``wait_readable``/``wait_writable``: no trio socket object per fd, no task per
message. Up to :data:`MAX_FDS` fds travel in one packet.

The heartbeat's counters (the ``stats`` of a ``beat``) have one shape, defined here:
:data:`COUNTERS` and :data:`STATUS` add up across workers into the herd's totals
(:func:`total_stats`), :data:`WORKER_COUNTS` are per worker only. :func:`decode` checks a
beat's stats with :func:`check_stats`.
"""

from __future__ import annotations

import array
import errno
import json
import socket
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import trio

from ._errors import IPCProtocolError

PROTOCOL_VERSION = 3
MAX_FDS = 16
MAX_PACKET = 256 * 1024
MAX_MESSAGE = 64 * 1024  # what send_to_primary() accepts: well within a socket buffer
_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS * _FD_SIZE)

# Fields each message type must carry, with their types. Extra fields are ignored.
_NUMBER = (int, float)
SCHEMA: dict[str, dict[str, Any]] = {
    # primary -> worker
    "init": {"v": int, "id": int, "slot": int, "config": dict},
    "disconnect": {"grace": _NUMBER},
    "msg": {"data": object},
    # worker -> primary
    "ready": {"v": int, "pid": int},
    "boot_error": {"text": str},
    "beat": {"stats": dict},
    "draining": {},
    # primary -> mold (--preload, worker.mold): its config, then one request per worker
    "mold": {"v": int, "generation": int, "config": dict},
    "fork": {"id": int},
    # mold -> primary (besides "ready" and "boot_error", as a worker says them)
    "forked": {"pid": int},
    "exited": {"pid": int, "code": int},
}

# The shape of a heartbeat's ``stats``. Every key is optional (a missing one counts as 0).
# cumulative; summed into the herd's totals
# (``shed``: idle keep-alive connections closed to make room near --max-connections)
COUNTERS = ("requests", "bytes_in", "bytes_out", "shed", "ws_messages_in", "ws_messages_out")
WORKER_COUNTS = ("open", "websockets")  # per worker: open connections, WebSockets now
STATUS = "status"  # {"2xx": n, ...}: requests by status class; summed into the totals
STATUS_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")  # the keys STATUS may have
CUTS = "cuts"  # {"send_timeout": n, ...}: connections the server cut, by reason; summed
CUT_REASONS = (
    "head_timeout",  # a request head not received within --header-timeout (answered 408)
    "body_timeout",  # a request body stalled for --header-timeout (answered 408)
    "send_timeout",  # a client that took nothing of an answer for --send-timeout (reset)
    "shed",  # an idle keep-alive connection closed near --max-connections
    "limit",  # a head, body or WebSocket message over its limit (431, 413, close 1009)
    "ping_timeout",  # a WebSocket client that did not answer a ping in time
    "close_timeout",  # a WebSocket client that did not answer our close frame in time
    "proxy_refused",  # a PROXY header from a peer not in --proxy-protocol-allow-ips
)


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_stats(stats: Any) -> None:
    """Raise IPCProtocolError unless ``stats`` is a heartbeat's counters: a dict whose
    :data:`COUNTERS` and :data:`WORKER_COUNTS` are whole numbers (not bools) and whose
    :data:`STATUS` and :data:`CUTS` map str to whole numbers. Keys may be missing; other
    keys are ignored."""
    if isinstance(stats, dict):
        maps = [stats.get(STATUS, {}), stats.get(CUTS, {})]
        if all(_whole(stats.get(key, 0)) for key in COUNTERS + WORKER_COUNTS) and all(
            isinstance(counts, dict)
            and all(isinstance(key, str) and _whole(n) for key, n in counts.items())
            for counts in maps
        ):
            return
    raise IPCProtocolError(f"malformed counters {stats!r}"[:200])


def total_stats(many: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The sum of checked stats (or of earlier totals): :data:`COUNTERS`, :data:`STATUS`
    and :data:`CUTS`.

    The result has every counter (0 if none was reported), and ``status`` and ``cuts``
    dicts of its own.
    """
    totals: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    status: dict[str, int] = {}
    cuts: dict[str, int] = {}
    for stats in many:
        for key in COUNTERS:
            totals[key] += stats.get(key, 0)
        for key, count in stats.get(STATUS, {}).items():
            status[key] = status.get(key, 0) + count
        for key, count in stats.get(CUTS, {}).items():
            cuts[key] = cuts.get(key, 0) + count
    totals[STATUS] = status
    totals[CUTS] = cuts
    return totals


# The connection channel: a second SOCK_SEQPACKET pair per worker that carries nothing but
# accepted fds, one packet per batch of up to MAX_FDS, primary -> worker. Its packets are
# binary: the listener's index and the batch's sequence number, which the worker
# acknowledges (in its tally, ``_tally``) before it reads a byte of them.
_CONN = struct.Struct("!IQ")
END_OF_CONNS = 0xFFFFFFFF
"""The listener index of the packet that tells a draining worker no connection follows."""


def encode_conn(listener: int, seq: int) -> bytes:
    return _CONN.pack(listener, seq)


def decode_conn(packet: bytes) -> tuple[int, int]:
    """(listener index, sequence number); raises IPCProtocolError if malformed."""
    try:
        listener, seq = _CONN.unpack(packet)
    except struct.error:
        raise IPCProtocolError(f"malformed connection packet {packet[:20]!r}") from None
    return int(listener), int(seq)


def encode(kind: str, **fields: Any) -> bytes:
    fields["t"] = kind
    return json.dumps(fields, separators=(",", ":")).encode()


def decode(packet: bytes) -> dict[str, Any]:
    """Parse and check one packet. Raises IPCProtocolError if it is not a known message."""
    try:
        message = json.loads(packet)
    except (UnicodeDecodeError, ValueError) as exc:
        raise IPCProtocolError(f"undecodable packet {packet[:60]!r}: {exc}") from None
    if not isinstance(message, dict):
        raise IPCProtocolError(f"packet is not an object: {packet[:60]!r}")
    kind = message.get("t")
    schema = SCHEMA.get(kind) if isinstance(kind, str) else None
    if schema is None:
        raise IPCProtocolError(f"unknown message type {kind!r}")
    for field, wanted in schema.items():
        if field not in message:
            raise IPCProtocolError(f"{kind!r} message lacks {field!r}")
        value = message[field]
        if wanted is not object and (isinstance(value, bool) or not isinstance(value, wanted)):
            raise IPCProtocolError(f"{kind!r} message has a bad {field!r}: {value!r}")
    if kind == "beat":
        check_stats(message["stats"])
    return message


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            socket.close(fd)
        except OSError:
            pass


class ChannelClosed(Exception):
    """The peer closed its end (it exited or was killed)."""


_BROKEN = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED, errno.EBADF)


class Channel:
    """One end of a SOCK_SEQPACKET pair, driven by trio's I/O waits."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._send_lock = trio.Lock()
        self.closed = False

    def try_send(self, data: bytes, fds: Sequence[int] = ()) -> bool:
        """Send at once if the socket has room; False if it would block."""
        try:
            if fds:
                self.sock.sendmsg(
                    [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                )
            else:
                self.sock.send(data)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno in _BROKEN:
                raise ChannelClosed(str(exc)) from None
            raise
        return True

    async def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send one message (and fds). Fast path without a lock; waiters queue on the lock."""
        if self.closed:
            raise ChannelClosed("channel closed")
        if not self._send_lock.locked() and self.try_send(data, fds):
            return  # nobody queued ahead of us: messages keep their order
        async with self._send_lock:
            while not self.try_send(data, fds):
                await trio.lowlevel.wait_writable(self.sock)

    def offer(self, data: bytes, fds: Sequence[int] = ()) -> bool:
        """Send at once, keeping order (False if a send is queued or the socket is full)."""
        if self.closed:
            raise ChannelClosed("channel closed")
        return not self._send_lock.locked() and self.try_send(data, fds)

    def receive_nowait(self) -> tuple[bytes, list[int]]:
        """One packet and its fds. BlockingIOError when none; ChannelClosed on EOF."""
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(
                MAX_PACKET, _ANCILLARY_SPACE, socket.MSG_CMSG_CLOEXEC
            )
        except BlockingIOError:
            raise
        except OSError as exc:
            if exc.errno in _BROKEN:
                raise ChannelClosed(str(exc)) from None
            raise
        fds: list[int] = []
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                received = array.array("i")
                received.frombytes(payload[: len(payload) - len(payload) % _FD_SIZE])
                fds.extend(received)
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            close_fds(fds)
            raise IPCProtocolError("packet or its fds were truncated")
        if not data:
            close_fds(fds)
            raise ChannelClosed("end of channel")
        return data, fds

    async def receive_batch(self) -> list[tuple[bytes, list[int]]]:
        """Wait until readable, then take every packet queued (at least one)."""
        batch: list[tuple[bytes, list[int]]] = []
        while True:
            await trio.lowlevel.wait_readable(self.sock)
            while len(batch) < 256:
                try:
                    batch.append(self.receive_nowait())
                except BlockingIOError:
                    break
                except ChannelClosed:
                    if batch:
                        return batch
                    raise
            if batch:
                return batch

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(primary end, worker end); the worker end is made inheritable by the spawner."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
