"""HTTP/2 frames counted before h2 reads them, without I/O: the floods and the header block.

:class:`FrameScan` reads only the 9-byte head of each frame a client sends (it skips the
preface and every payload; a head may arrive in pieces) and tells ``protocols.h2core`` when
to end the connection with GOAWAY ENHANCE_YOUR_CALM, before h2 has done any work for the
frames (decoded them, buffered them, or queued an answer to each):

- a header block (HEADERS and its CONTINUATION frames) of more than ``block_limit`` bytes:
  the CONTINUATION flood (CVE-2024-27316) ends there, where h2 alone would buffer up to 64
  frames of up to 16 KiB before it gives up (``HEADER_FLOOD``);
- SETTINGS, PING, PRIORITY frames and DATA frames that are empty without ending their
  stream: counted per :data:`FLOOD_WINDOW`, past :data:`FLOOD_LIMITS` (``<kind>_flood``).

:class:`ResetCount` is the Rapid Reset count (CVE-2023-44487), kept by the core from h2's
events: a reset is only known to matter once h2 says which stream it ends.

It also says whether a header block is being received (:attr:`FrameScan.in_block`): the
core's HEAD phase, under ``header_timeout``.
"""

from __future__ import annotations

import math

__all__ = [
    "FLOOD_LIMITS",
    "FLOOD_WINDOW",
    "HEADER_FLOOD",
    "RESET_LIMIT",
    "FloodCount",
    "FrameScan",
    "ResetCount",
]

FLOOD_WINDOW = 10.0
"""Seconds over which the flood limits count (fixed windows)."""
FLOOD_LIMITS = {"settings": 100, "ping": 1000, "priority": 1000, "empty_data": 1000}
"""Frames of each kind a client may send per :data:`FLOOD_WINDOW` (an empty DATA frame is
one without END_STREAM)."""
RESET_LIMIT = 100
"""Streams a client may reset before they are answered, per :data:`FLOOD_WINDOW`, before
Rapid Reset is suspected (it is once they are also over half the streams opened)."""
HEADER_FLOOD = "header_flood"

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _PRIORITY, _SETTINGS, _PING, _CONTINUATION = 0x0, 0x1, 0x2, 0x4, 0x6, 0x9
_END_STREAM, _END_HEADERS = 0x1, 0x4
_FLOOD_KINDS = {_SETTINGS: "settings", _PING: "ping", _PRIORITY: "priority"}


class FloodCount:
    """Frames of one kind per :data:`FLOOD_WINDOW` (fixed windows, from the first frame)."""

    __slots__ = ("count", "limit", "start")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.count = 0
        self.start = -math.inf

    def hit(self, now: float) -> bool:
        """Count one; True once the window's count is over the limit."""
        if now - self.start >= FLOOD_WINDOW:
            self.start = now
            self.count = 0
        self.count += 1
        return self.count > self.limit


class ResetCount:
    """Streams opened and streams reset unanswered, per :data:`FLOOD_WINDOW`: Rapid Reset
    is more than :data:`RESET_LIMIT` resets that are also over half the streams opened."""

    __slots__ = ("opened", "resets", "start")

    def __init__(self) -> None:
        self.opened = self.resets = 0
        self.start = -math.inf

    def _roll(self, now: float) -> None:
        if now - self.start >= FLOOD_WINDOW:
            self.start = now
            self.opened = self.resets = 0

    def open(self, now: float) -> None:
        self._roll(now)
        self.opened += 1

    def reset(self, now: float) -> bool:
        """Count one reset; True if the client resets faster than it is served."""
        self._roll(now)
        self.resets += 1
        return self.resets > RESET_LIMIT and 2 * self.resets > self.opened


class FrameScan:
    """The heads of the frames a client sends, read before h2 parses them: the bytes of
    the header block being received (bounded: a CONTINUATION flood ends at ``block_limit``
    bytes, not after h2 has buffered 64 frames of 16 KiB) and the floods of frames that
    cost work without a request. It skips the client's preface and every payload; a
    frame's head may come in pieces."""

    __slots__ = ("block", "block_limit", "ends_block", "floods", "head", "in_block", "skip")

    def __init__(self, block_limit: int) -> None:
        self.skip = len(PREFACE)  # bytes before the next frame's head
        self.head = b""  # the part of a frame's head received
        self.in_block = False  # a header block has begun and not ended
        self.ends_block = False  # the frame being skipped ends it
        self.block = 0
        self.block_limit = block_limit
        self.floods = {kind: FloodCount(limit) for kind, limit in FLOOD_LIMITS.items()}

    def feed(self, data: bytes, now: float) -> str | None:
        """Scan received bytes; the reason to end the connection, or None."""
        pos, size = 0, len(data)
        while True:
            if self.skip:
                step = min(self.skip, size - pos)
                pos += step
                self.skip -= step
                if self.skip:
                    return None
            if self.ends_block:
                self.ends_block = self.in_block = False
            need = 9 - len(self.head)
            if size - pos < need:
                self.head += data[pos:]
                return None
            head = self.head + data[pos : pos + need]
            pos += need
            self.head = b""
            length = int.from_bytes(head[:3], "big")
            self.skip = length
            why = self.frame(head[3], head[4], length, now)
            if why is not None:
                return why

    def frame(self, kind: int, flags: int, length: int, now: float) -> str | None:
        """One frame's head: counted, or measured if it carries a header block."""
        if kind == _HEADERS:
            self.in_block = True
            self.block = length
        elif kind == _CONTINUATION:
            self.block += length
        else:
            name = _FLOOD_KINDS.get(kind)
            if name is None:
                if kind != _DATA or length or flags & _END_STREAM:
                    return None
                name = "empty_data"
            return f"{name}_flood" if self.floods[name].hit(now) else None
        if self.block > self.block_limit:
            return HEADER_FLOOD
        self.ends_block = bool(flags & _END_HEADERS)
        return None
