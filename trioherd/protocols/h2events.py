"""What the HTTP/2 core (``protocols.h2core``) tells its driver: the events of a connection's
streams, and why a connection ends. Plain data, no I/O."""

from __future__ import annotations

from dataclasses import dataclass

from .framing import Fields

__all__ = [
    "BodyOverLimit",
    "ClientGoAway",
    "Event",
    "MustClose",
    "NewStream",
    "StreamBody",
    "StreamRefused",
    "StreamReset",
    "WindowOpened",
]

# reasons a connection ends (MustClose.reason); the cuts among them would join
# _ipc.CUT_REASONS when the drivers exist
CLIENT_CLOSED = "client_closed"
IDLE_CLOSE = "idle"
HEAD_TIMEOUT = "head_timeout"
PROTOCOL_ERROR = "protocol_error"
RAPID_RESET = "rapid_reset"
HPACK_BOMB = "hpack_bomb"
FRAME_TOO_LARGE = "frame_too_large"


# -- events ------------------------------------------------------------------------------


@dataclass(slots=True)
class NewStream:
    """A request's head: the driver takes the stream and starts its app. ``headers`` are
    the regular fields (no pseudo-header), with ``host`` added from ``:authority`` when
    the request has none and the cookie crumbs joined into one field (RFC 9113 8.2.3,
    8.3.1); ``client`` and ``scheme`` as trusted forwarded headers report them; ``end``:
    the request has no body."""

    stream_id: int
    method: bytes
    path: bytes
    authority: bytes
    scheme: str
    headers: Fields
    client: tuple[str, int] | None
    end: bool


@dataclass(slots=True)
class StreamBody:
    """A piece of a request's body (b"" when only its end comes); ``end``: the last."""

    stream_id: int
    data: bytes
    end: bool


@dataclass(slots=True)
class StreamReset:
    """The client reset a stream the driver took (``error_code``: the client's)."""

    stream_id: int
    error_code: int


@dataclass(slots=True)
class StreamRefused:
    """The core answered a stream itself (431, 413, 501) and never gave it to the driver."""

    stream_id: int
    status: int
    why: str


@dataclass(slots=True)
class BodyOverLimit:
    """A taken stream's body passed ``max_body_size`` (``received`` bytes so far)."""

    stream_id: int
    received: int


@dataclass(slots=True)
class WindowOpened:
    """The stream may send more (0: the connection, so every stream may)."""

    stream_id: int


@dataclass(slots=True)
class ClientGoAway:
    """The client sent GOAWAY: h2 sends nothing more; the driver stops and closes."""

    error_code: int
    last_stream_id: int
    stream_id: int = 0


@dataclass(slots=True)
class MustClose:
    """The connection ends: send :meth:`H2Core.data_to_send`, then close. ``reason`` is
    one of the module's reasons; ``error_code`` that of the GOAWAY sent (or received)."""

    reason: str
    error_code: int
    stream_id: int = 0


Event = (
    NewStream
    | StreamBody
    | StreamReset
    | StreamRefused
    | BodyOverLimit
    | WindowOpened
    | ClientGoAway
    | MustClose
)
