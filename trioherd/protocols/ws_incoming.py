"""A WebSocket message as it comes in, without I/O: assembled from its frames, measured
against ``--ws-max-size`` in bytes (fragments added up, after decompression), and, when
it is compressed (permessage-deflate), inflated in bounded pieces.

wsproto parses frames and decodes text; a compressed message's frames reach it empty
(``protocols.ws_inflate.BoundedDeflate`` holds their bytes), and :class:`Incoming`
inflates them here, at most :data:`INFLATE_PIECE` bytes at a time and never past the
limit by more than a byte: a message being received holds at most the limit plus one
piece, however well it was compressed. Its UTF-8 (a text message's) is decoded piece by
piece as it is inflated.
"""

from __future__ import annotations

import codecs
from typing import Any

from wsproto.frame_protocol import Frame, Opcode

from .ws_inflate import BoundedDeflate

INFLATE_PIECE = 256 * 1024
"""Bytes of a compressed message inflated in one step (the driver lets other tasks run
between two steps)."""


class TooBig(Exception):
    """A message passed the size limit."""


class Incoming:
    """The message being received: its pieces and its size against the limit, and the
    compressed frame piece being inflated (:attr:`inflating`)."""

    __slots__ = ("decoder", "deflate", "frame", "limit", "parts", "size")

    def __init__(self, limit: int, deflate: BoundedDeflate | None) -> None:
        self.limit = limit
        self.deflate = deflate  # the permessage-deflate agreed on, or None
        self.parts: list[Any] = []  # str or bytes pieces
        self.size = 0  # bytes so far
        self.decoder: codecs.IncrementalDecoder | None = None  # compressed text's UTF-8
        self.frame: Frame | None = None  # the compressed frame piece being inflated

    @property
    def inflating(self) -> bool:
        """A compressed frame piece is being inflated: :meth:`inflate` goes on with it."""
        return self.frame is not None

    def take(self, frame: Frame) -> str | bytes | None:
        """A data frame piece as wsproto parsed it: the message, once it is complete. The
        piece of a compressed message is only noted (see :meth:`inflate`). Raises TooBig
        past the limit."""
        deflate = self.deflate
        if deflate is not None and deflate.holding:
            self.frame = frame
            return None
        return self._add(frame.payload, frame.message_finished)  # type: ignore[arg-type]

    def inflate(self) -> str | bytes | None:
        """Inflate one piece of the compressed frame piece noted: the message, once it is
        complete (:attr:`inflating` says whether more is to come). Raises TooBig past the
        limit, ``zlib.error`` for what is not deflate, UnicodeDecodeError for text that is
        not UTF-8; the message is dropped then."""
        frame, deflate = self.frame, self.deflate
        assert frame is not None and deflate is not None
        try:
            data = deflate.inflate(min(INFLATE_PIECE, self.limit - self.size + 1))
            more = deflate.holding
            message = self._add_inflated(
                data, frame.opcode is Opcode.TEXT, frame.message_finished and not more
            )
        except Exception:
            self.drop()
            raise
        if not more:
            self.frame = None
        return message

    def drop(self) -> None:
        """Forget the message being received (the session is closing, or it failed)."""
        self.parts = []
        self.size = 0
        self.decoder = None
        self.frame = None
        if self.deflate is not None:
            self.deflate.discard()

    def _add(self, data: str | bytes, finished: bool) -> str | bytes | None:
        size = self.size + len(data)
        if type(data) is str and self.size + 4 * len(data) > self.limit:
            size = self.size + len(data.encode("utf-8", "surrogatepass"))
        if size > self.limit:
            self.drop()
            raise TooBig()
        if not finished:
            self.parts.append(data)
            self.size = size
            return None
        if self.parts:
            self.parts.append(data)
            data = ("" if type(data) is str else b"").join(self.parts)
            self.parts = []
            self.size = 0
            self.decoder = None
        return data

    def _add_inflated(self, data: bytes, text: bool, finished: bool) -> str | bytes | None:
        size = self.size + len(data)
        if size > self.limit:
            raise TooBig()
        piece: str | bytes = data
        if text:
            if self.decoder is None:
                if finished and not self.parts:
                    return data.decode("utf-8")  # the usual message: inflated in one piece
                self.decoder = codecs.getincrementaldecoder("utf-8")()
            piece = self.decoder.decode(data, finished)
        if not finished:
            self.parts.append(piece)
            self.size = size
            return None
        if self.parts:
            self.parts.append(piece)
            piece = ("" if text else b"").join(self.parts)
            self.parts = []
            self.size = 0
        self.decoder = None
        return piece
