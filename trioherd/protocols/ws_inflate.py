"""permessage-deflate (RFC 7692) with a bounded inflate, for the server's side.

wsproto's ``PerMessageDeflate`` inflates each piece of a compressed frame as it is parsed,
whole: 64 KiB read from a hostile client may inflate to 64 MiB before anything can look
at the size (a "zip bomb": 100 KB on the wire of a 100 MiB message took a worker from 47
to 231 MiB). :class:`BoundedDeflate` compresses what we send as wsproto does, but does
not inflate what it receives: it holds the compressed bytes of the frame piece wsproto
just parsed (a data frame of a compressed message then reaches wsproto's message decoder
empty), and the session (``protocols.ws_session``) takes them out with :meth:`inflate`,
at most a given number of bytes at a time, so that it can stop at ``--ws-max-size`` the
moment the message passes it, and let other tasks run between two pieces.

No I/O here: the session calls :meth:`inflate`, the Trio driver decides when it runs.
"""

from __future__ import annotations

import zlib
from typing import Protocol

from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import CloseReason, FrameDecoder, FrameProtocol, Opcode, RsvBits

_SYNC_TAIL = b"\x00\x00\xff\xff"  # RFC 7692 7.2.2: the tail the sender removed, put back


class Inflater(Protocol):
    """What ``zlib.decompressobj()`` gives (its class has no public name)."""

    @property
    def unconsumed_tail(self) -> bytes: ...

    def decompress(self, data: bytes, max_length: int = 0, /) -> bytes: ...


class BoundedDeflate(PerMessageDeflate):
    """permessage-deflate whose inbound side is inflated on demand, in bounded pieces.

    Negotiated like wsproto's (``accept``), and sends the same bytes (``frame_outbound``
    is wsproto's). Inbound, RFC 7692 as wsproto reads it: RSV1 marks the first frame of a
    compressed message; the message's frames, once fin, end with the sync tail put back;
    the client's window bits and ``client_no_context_takeover`` apply. A control frame
    between two frames of a compressed message leaves the message compressed (wsproto's
    own extension forgets it there).
    """

    def __init__(self) -> None:
        super().__init__()
        self._held = b""  # compressed bytes not inflated yet (a frame piece, then its tail)
        self._more = False  # zlib may hold output not given yet (the last piece was full)
        self._message_ends = False  # the held bytes end the message (the tail is in them)
        self._compressed = False  # the message being received is compressed
        self._control = False  # the frame being received is a control frame
        self._inflater: Inflater | None = None

    # -- what wsproto's frame decoder calls, frame by frame ---------------------------

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        """A frame's head (may be read twice when its mask came late: no counting here)."""
        if rsv.rsv1 and (opcode.iscontrol() or opcode is Opcode.CONTINUATION):
            return CloseReason.PROTOCOL_ERROR
        self._control = opcode.iscontrol()
        if not self._control and opcode is not Opcode.CONTINUATION:
            self._compressed = rsv.rsv1  # the first frame of a message says it
        return RsvBits(True, False, False)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        """Keep a compressed message's bytes for :meth:`inflate`; pass the rest through."""
        if self._control or not self._compressed:
            return data
        self._held += data
        return b""

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if fin and self._compressed and not self._control:
            self._held += _SYNC_TAIL
            self._message_ends = True
        return None

    # -- what the session calls ---------------------------------------------------------

    @property
    def holding(self) -> bool:
        """Compressed bytes of the frame piece just parsed wait to be inflated."""
        return bool(self._held) or self._more

    def inflate(self, limit: int) -> bytes:
        """At most ``limit`` bytes more of the held piece, inflated (b"": nothing held).
        Raises ``zlib.error`` for data that is not deflate."""
        assert limit > 0  # zlib reads 0 as "no limit"
        inflater = self._inflater
        if inflater is None:
            inflater = self._inflater = zlib.decompressobj(-self.client_max_window_bits)
        data = inflater.decompress(self._held, limit)
        self._held = inflater.unconsumed_tail
        self._more = len(data) == limit  # a full piece: zlib may have more for the next
        if self._message_ends and not self._held and not self._more:
            self._message_ends = False
            if self.client_no_context_takeover:
                self._inflater = None  # each message starts a fresh window
        return data

    def discard(self) -> None:
        """Drop what is held: the session is closing, what still comes is not read."""
        self._held = b""
        self._more = self._message_ends = False
