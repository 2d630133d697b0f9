"""The WSGI app's streams (PEP 3333), used in the app's thread: ``wsgi.input``
(:class:`InputStream`) and ``wsgi.file_wrapper`` (:class:`FileWrapper`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from ..protocols.http1 import BodyReader
from .threadpool import Job


class InputStream:
    """``wsgi.input``: the request body, read from the connection as the app asks for it.

    Each time it needs more, it asks the connection's task for the next piece the client
    sent (``BodyReader.next_chunk``: the body limit, 100-continue on the first read, a
    chunked body decoded), and keeps only what the app has not read yet of that piece: the
    body is never buffered whole, unless the app asks for all of it with ``read()``.
    ``read(n)`` returns ``n`` bytes unless the body ends first, as a file does.
    """

    __slots__ = ("_data", "_job", "_pos", "_reader")

    def __init__(self, job: Job, reader: BodyReader | None) -> None:
        self._job = job
        self._reader = reader  # None: no body, or all of it was read
        self._data = b""  # the piece being read, from _pos on
        self._pos = 0

    def _fetch(self) -> bytes:
        """The next piece of body (b"" at its end)."""
        reader = self._reader
        if reader is None:
            return b""
        chunk: bytes = self._job.call(reader.next_chunk)
        if not chunk:
            self._reader = None
        return chunk

    def read(self, size: int | None = -1) -> bytes:
        return self._take(size, line=False)

    def readline(self, size: int | None = -1) -> bytes:
        return self._take(size, line=True)

    def _take(self, size: int | None, line: bool) -> bytes:
        """Up to ``size`` bytes (all, if None or negative), and with ``line`` no further
        than the first newline (included)."""
        limit = -1 if size is None or size < 0 else size
        parts = []
        have = 0
        data, pos = self._data, self._pos
        while True:
            stop = len(data) if limit < 0 else min(len(data), pos + limit - have)
            newline = data.find(b"\n", pos, stop) if line else -1
            if newline >= 0:
                stop = newline + 1
            if stop > pos:
                parts.append(data[pos:stop])
                have += stop - pos
            if newline >= 0 or 0 <= limit <= have:
                self._data, self._pos = data, stop
                break
            data, pos = self._fetch(), 0
            if not data:
                self._data, self._pos = b"", 0
                break
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self) -> Iterator[bytes]:
        while line := self.readline():
            yield line


class FileWrapper:
    """``wsgi.file_wrapper(filelike, block_size=8192)``: a file the server may send its
    own way (``os.sendfile`` on a plain connection, when it is a regular file with a
    descriptor); otherwise iterated in blocks of ``block_size``. ``close()`` closes it."""

    __slots__ = ("block_size", "filelike")

    def __init__(self, filelike: Any, block_size: int = 8192) -> None:
        self.filelike = filelike
        self.block_size = block_size

    def __iter__(self) -> Iterator[bytes]:
        return self.blocks(self.block_size)

    def blocks(self, size: int, limit: int = -1) -> Iterator[bytes]:
        """The file's content (``limit`` bytes of it, if not negative), read ``size``
        bytes at a time."""
        read = self.filelike.read
        while limit:
            block = read(size if limit < 0 else min(size, limit))
            if not block:
                return
            if limit > 0:
                limit -= len(block)
            yield block

    def close(self) -> None:
        close = getattr(self.filelike, "close", None)
        if close is not None:
            close()
