"""The WebSocket opening handshake (RFC 6455 4.2): what a request that asks for a
WebSocket says (:func:`read_handshake`), what is refused before the app runs (400; 426
with ``Sec-WebSocket-Version: 13``; 503 while the worker drains), the permessage-deflate
negotiation, and the 101 answer (:meth:`Handshake.response`). Read from the request head
h11 or llhttp parsed; no I/O but the refusal's answer.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterable

from wsproto.extensions import Extension
from wsproto.utilities import generate_accept_token

from .framing import Fields, check_field, http_date, reason
from .http1 import HTTPConnection, RequestHead
from .ws_inflate import BoundedDeflate

log = logging.getLogger("trioherd.http")

_OURS = (b"upgrade", b"connection", b"sec-websocket-accept", b"sec-websocket-extensions")
_DEFLATE_PARAMS = {
    "client_no_context_takeover",
    "server_no_context_takeover",
    "client_max_window_bits",
    "server_max_window_bits",
}


# -- the handshake ----------------------------------------------------------------------


class Handshake:
    """A request that asks for a WebSocket, as read from its head (RFC 6455 4.2.1)."""

    __slots__ = ("extensions", "key", "refusal", "subprotocols")

    def __init__(
        self,
        key: bytes,
        subprotocols: list[str],
        extensions: list[str],
        refusal: tuple[int, str, Fields] | None,
    ) -> None:
        self.key = key
        self.subprotocols = subprotocols
        self.extensions = extensions
        self.refusal = refusal  # (status, why, extra headers): answered before the app runs

    def response(
        self, subprotocol: str | None, headers: Iterable[tuple[bytes, bytes]], deflate: bool
    ) -> tuple[bytes, list[Extension]]:
        """The 101 response head accepting it, and the extensions agreed on."""
        if subprotocol is not None and subprotocol not in self.subprotocols:
            raise RuntimeError(
                f"WebSocket subprotocol {subprotocol!r} was not offered by the client "
                f"(offered: {self.subprotocols})"
            )
        parts = [
            b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\n"
            b"sec-websocket-accept: %s\r\n" % generate_accept_token(self.key)
        ]
        if subprotocol is not None:
            parts.append(b"sec-websocket-protocol: %s\r\n" % subprotocol.encode("latin-1"))
        extensions: list[Extension] = []
        agreed = _negotiate_deflate(self.extensions) if deflate else None
        if agreed is not None:
            parts.append(b"sec-websocket-extensions: %s\r\n" % agreed[0])
            extensions.append(agreed[1])
        has_date = has_server = False
        for name, value in headers:
            lowered = name.lower()
            check_field(name, value)
            if lowered == b"sec-websocket-protocol":
                raise RuntimeError("choose the WebSocket subprotocol with subprotocol=")
            if lowered in _OURS:
                continue
            has_date = has_date or lowered == b"date"
            has_server = has_server or lowered == b"server"
            parts.append(b"%s: %s\r\n" % (name, value))
        if not has_date:
            parts.append(b"date: %s\r\n" % http_date())
        if not has_server:
            parts.append(b"server: trioherd\r\n")
        parts.append(b"\r\n")
        return b"".join(parts), extensions


def read_handshake(http: HTTPConnection, request: RequestHead) -> Handshake | None:
    """The WebSocket handshake a request asks for; None if it asks for none (or ``--ws
    none``): it is then served as plain HTTP."""
    if http.state.config.ws == "none":
        return None
    upgrade = connection = False
    keys: list[bytes] = []
    version = None
    subprotocols: list[str] = []
    extensions: list[str] = []
    for name, value in http.exchange.headers:
        if name == b"upgrade":
            upgrade = upgrade or b"websocket" in _tokens(value)
        elif name == b"connection":
            connection = connection or b"upgrade" in _tokens(value)
        elif name == b"sec-websocket-key":
            keys.append(value.strip())
        elif name == b"sec-websocket-version":
            version = value.strip()
        elif name == b"sec-websocket-protocol":
            subprotocols.extend(_items(value))
        elif name == b"sec-websocket-extensions":
            extensions.extend(_items(value))
    if not (upgrade and connection):
        return None
    refusal: tuple[int, str, Fields] | None = None
    if request.method != b"GET" or request.http_version != b"1.1" or not http.exchange.bodyless:
        refusal = (400, "a WebSocket handshake is an HTTP/1.1 GET without a body", [])
    elif version != b"13":
        refusal = (426, f"WebSocket version {version!r}", [(b"sec-websocket-version", b"13")])
    elif len(keys) != 1 or not _valid_key(keys[0]):
        refusal = (400, "bad Sec-WebSocket-Key", [])
    elif http.state.draining:
        refusal = (503, "the worker is shutting down", [(b"retry-after", b"1")])
    return Handshake(keys[0] if keys else b"", subprotocols, extensions, refusal)


def _tokens(value: bytes) -> list[bytes]:
    return [token.strip() for token in value.lower().split(b",")]


def _items(value: bytes) -> list[str]:
    return [item.strip() for item in value.decode("latin-1").split(",") if item.strip()]


def _valid_key(key: bytes) -> bool:
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except (binascii.Error, ValueError):
        return False


def _negotiate_deflate(offers: list[str]) -> tuple[bytes, BoundedDeflate] | None:
    """The first permessage-deflate offer we can take (RFC 7692): the header value of our
    answer, and the extension configured for it (inbound, inflated in bounded pieces:
    ``protocols.ws_inflate``); None if there is none."""
    for offer in offers:
        name, _, params = offer.partition(";")
        if name.strip() != "permessage-deflate" or not _acceptable_deflate(params):
            continue
        extension = BoundedDeflate()
        try:
            agreed = extension.accept(offer)
        except ValueError:
            continue
        if agreed is None or agreed is False:
            continue
        header = b"permessage-deflate"
        if isinstance(agreed, str) and agreed:
            header += b"; " + agreed.encode("ascii")
        return header, extension
    return None


def _acceptable_deflate(params: str) -> bool:
    """RFC 7692 7.1: decline an offer with an unknown or repeated parameter, or a window
    size we cannot use (zlib's raw deflate takes 9 to 15)."""
    seen = set()
    for param in params.split(";"):
        name, eq, value = (part.strip() for part in param.partition("="))
        if not name:
            continue
        if name not in _DEFLATE_PARAMS or name in seen:
            return False
        seen.add(name)
        value = value.strip('"')
        if name.endswith("window_bits"):
            if eq and not (value.isdigit() and 9 <= int(value) <= 15):
                return False
            if not eq and name == "server_max_window_bits":
                return False
        elif eq:
            return False
    return True


async def refuse(http: HTTPConnection, status: int, detail: str, extra: Fields) -> int:
    """An HTTP answer instead of a WebSocket (the connection closes after it)."""
    body = b"%d %s\n" % (status, reason(status))
    headers = [(b"content-type", b"text/plain; charset=utf-8"), *extra]
    await http.send_complete(status, headers, body)
    log.debug("%d to %s: %s", status, http.exchange.client, detail)
    return status
