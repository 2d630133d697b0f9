"""What the kernel knows of a connection's socket, asked without I/O of ours: bytes it holds
for the client, bytes from the client nobody read, and a close that resets. Any runtime's
stream with a ``socket`` (or a ``transport_stream`` with one) can be asked.
"""

from __future__ import annotations

import fcntl
import socket
import struct
import termios
from typing import Any

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a reset


def socket_of(stream: Any) -> Any:
    """The socket under ``stream`` (a stdlib or trio one), or None."""
    return getattr(getattr(stream, "transport_stream", stream), "socket", None)


def queued_bytes(stream: Any) -> int:
    """Bytes the kernel holds for the client (SIOCOUTQ: not sent, or not acknowledged
    yet); -1 if that cannot be known."""
    try:
        found = fcntl.ioctl(socket_of(stream).fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except (AttributeError, OSError, ValueError):
        return -1
    return int(struct.unpack("i", found)[0])


def unread_bytes(stream: Any) -> int:
    """Bytes from the client the kernel holds that nobody has read yet (FIONREAD); 0 if
    that cannot be known."""
    try:
        found = fcntl.ioctl(socket_of(stream).fileno(), termios.FIONREAD, b"\0\0\0\0")
    except (AttributeError, OSError, ValueError):
        return 0
    return int(struct.unpack("i", found)[0])


def reset_on_close(stream: Any) -> None:
    """Make closing ``stream`` send a reset: the kernel drops what the client did not
    take, instead of holding it (and the connection) for a client that does not read."""
    try:
        socket_of(stream).setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    except (AttributeError, OSError):
        pass
