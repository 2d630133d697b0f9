"""The PROXY protocol (HAProxy's, v1 text and v2 binary): the real client address a load
balancer puts in front of every connection it opens to the herd.

:func:`parse` and :func:`starts_like_header` are sans-IO. :func:`read_header` reads one
header from a raw socket inside the worker without reading a byte past it (each read is
sized by what a peek showed), so what follows — an HTTP request, or a TLS ClientHello — is
left for the next layer; :func:`peeks_like_header` only peeks.

:class:`ProxyGate` decides whose header is believed (``--proxy-protocol-allow-ips``): a
connection from an allowed peer must start with a header; one from another peer is served
as it is, with its socket's address, unless it starts with a header anyway: then it is a
forgery (anyone can write one), and the connection is closed unanswered, counted and
logged as a cut (``proxy_refused``, see ``protocols.shared.Cuts``). So forwarded-header
trust is decided on
the socket's peer, or on the address named by a header that came from an allowed peer,
never on an address a stranger claims.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Protocol

from .forwarded import TrustedPeers

Address = tuple[str, int]

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included
V2_MAX = 16 + 4096  # the fixed part + addresses and TLVs we accept
_V2_FIXED = struct.Struct("!12sBBH")


class ProxyProtocolError(Exception):
    """Not a valid PROXY protocol header."""


class NeedData(Exception):
    """The data is the beginning of a header: every byte of it belongs to the header."""


class ForgedHeader(ProxyProtocolError):
    """A PROXY header from a peer that is not allowed to send one."""


def parse(data: bytes) -> tuple[Address | None, int]:
    """(source address or None for LOCAL/UNKNOWN, header length) from the start of
    ``data``. Raises NeedData when more is needed, ProxyProtocolError when it is not a
    header."""
    if data[:1] == b"P":
        return _parse_v1(data)
    if data[:1] == b"\r":
        return _parse_v2(data)
    if not data:
        raise NeedData()
    raise ProxyProtocolError("no PROXY protocol header")


def _parse_v1(data: bytes) -> tuple[Address | None, int]:
    if not data.startswith(V1_PREFIX[: len(data)]):
        raise ProxyProtocolError("no PROXY protocol header")
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX:
            raise ProxyProtocolError("PROXY v1 line too long")
        raise NeedData()
    parts = data[:end].decode("ascii", "replace").split(" ")
    if len(parts) >= 2 and parts[1] == "UNKNOWN":
        return None, end + 2
    if len(parts) != 6 or parts[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"bad PROXY v1 line {data[:end]!r}")
    family = socket.AF_INET if parts[1] == "TCP4" else socket.AF_INET6
    try:
        socket.inet_pton(family, parts[2])
        socket.inet_pton(family, parts[3])
        port = int(parts[4])
        int(parts[5])
    except (OSError, ValueError):
        raise ProxyProtocolError(f"bad PROXY v1 line {data[:end]!r}") from None
    if not 0 <= port <= 65535 or not parts[4].isdigit():
        raise ProxyProtocolError(f"bad PROXY v1 port {parts[4]!r}")
    return (parts[2], port), end + 2


def _parse_v2(data: bytes) -> tuple[Address | None, int]:
    if not V2_SIGNATURE.startswith(data[:12]):
        raise ProxyProtocolError("no PROXY protocol header")
    if len(data) < 16:
        raise NeedData()
    _, version_command, family, length = _V2_FIXED.unpack_from(data)
    if version_command >> 4 != 2 or version_command & 0x0F not in (0, 1):
        raise ProxyProtocolError(f"bad PROXY v2 version/command {version_command:#x}")
    total = 16 + length
    if total > V2_MAX:
        raise ProxyProtocolError("PROXY v2 header too long")
    if len(data) < total:
        raise NeedData()
    if version_command & 0x0F == 0:  # LOCAL: the balancer's own connection (health check)
        return None, total
    body = data[16:total]
    if family == 0x11 and len(body) >= 12:  # TCP over IPv4
        return (socket.inet_ntop(socket.AF_INET, body[:4]), int.from_bytes(body[8:10])), total
    if family == 0x21 and len(body) >= 36:  # TCP over IPv6
        host = socket.inet_ntop(socket.AF_INET6, body[:16])
        return (host, int.from_bytes(body[32:34])), total
    if family == 0x00:  # UNSPEC
        return None, total
    raise ProxyProtocolError(f"unsupported PROXY v2 address family {family:#x}")


class Waits(Protocol):
    """How a runtime waits for a socket (``protocols.rawstream.TrioWaits``, and the
    asyncio runtime's ``aio.connection.AioWaits``): its clock, and a wait until the
    socket is readable that raises TimeoutError at ``deadline`` (on that clock)."""

    def now(self) -> float: ...

    async def readable(self, sock: socket.socket, deadline: float) -> None: ...


async def read_header(sock: socket.socket, deadline: float, waits: Waits) -> Address | None:
    """Read one PROXY header from a non-blocking socket by ``deadline``. Returns the
    source address (None: keep the socket's own). Raises ProxyProtocolError for anything
    else, TimeoutError past the deadline.

    Never reads past the header: it peeks, and takes only bytes that parse() has shown
    to belong to the header (all of an incomplete one, exactly the length of a whole one).
    """
    data = b""
    while True:
        await waits.readable(sock, deadline)
        peeked = sock.recv(V2_MAX, socket.MSG_PEEK)
        if not peeked:
            raise ProxyProtocolError("connection closed before its PROXY header")
        try:
            address, length = parse(data + peeked)
        except NeedData:
            data += sock.recv(len(peeked))
            continue
        sock.recv(length - len(data))  # peeked, so it is all there
        return address


def starts_like_header(data: bytes) -> bool | None:
    """Whether the first bytes of a connection begin a PROXY header (v1's ``PROXY `` or
    v2's signature): True or False, or None while they are too few to tell."""
    for signature in (V1_PREFIX, V2_SIGNATURE):
        if signature.startswith(data[: len(signature)]):
            return True if len(data) >= len(signature) else None
    return False


async def peeks_like_header(sock: socket.socket, deadline: float, waits: Waits) -> bool:
    """Whether a connection starts with a PROXY header, read by ``deadline`` without
    taking a byte off the socket. While the bytes there are too few to tell, it waits for
    one more (``SO_RCVLOWAT``); a peer that closes its side before that does not start
    with a header. Raises TimeoutError past the deadline."""
    wanted = 0  # bytes the socket waits for (SO_RCVLOWAT), once the first were too few
    try:
        while True:
            await waits.readable(sock, deadline)
            peeked = sock.recv(len(V2_SIGNATURE), socket.MSG_PEEK)
            if not peeked or len(peeked) < wanted:  # readable with no more: the end
                return False
            verdict = starts_like_header(peeked)
            if verdict is not None:
                return verdict
            wanted = len(peeked) + 1
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, wanted)
    finally:
        if wanted:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


class ProxyGate:
    """Whose PROXY headers a worker believes (``--proxy-protocol-allow-ips``); a connection
    refused for a header from anyone else is reported to ``on_refused`` (the worker counts
    and logs it as a cut, ``proxy_refused``)."""

    def __init__(
        self,
        allow_ips: str,
        timeout: float,
        on_refused: Callable[[Address], None],
        waits: Waits,
    ) -> None:
        self.allowed = TrustedPeers(allow_ips)
        self.timeout = timeout  # for the header, or the bytes that tell there is none
        self.on_refused = on_refused
        self.waits = waits  # the runtime's

    def allows(self, peer: Address | None) -> bool:
        """A peer on a Unix socket (None) can only be local, and is allowed."""
        return peer is None or peer[0] in self.allowed

    async def client(self, sock: socket.socket, peer: Address | None) -> Address | None:
        """The client of a new connection from ``peer``: the address the PROXY header of
        an allowed peer names (None: keep the socket's, as for LOCAL and UNKNOWN), or
        ``peer`` itself for a connection from another peer without a header. Raises
        ForgedHeader for a header from a peer not allowed, ProxyProtocolError for no valid
        header from an allowed one, TimeoutError past the timeout: close it."""
        waits = self.waits
        deadline = waits.now() + self.timeout
        if self.allows(peer):
            return await read_header(sock, deadline, waits)
        if not await peeks_like_header(sock, deadline, waits):
            return peer
        assert peer is not None
        self.on_refused(peer)
        raise ForgedHeader(f"a PROXY header from {peer[0]}, not in --proxy-protocol-allow-ips")
