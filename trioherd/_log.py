"""Logging set-up shared by the primary and the workers: one line per record on stderr.

Two formats (``--log-format``):

- ``text``: ``2026-01-01 12:00:00,123 trioherd[w3] INFO message``, tagged with who wrote it
  (``primary`` or ``w<id>``);
- ``json``: one JSON object per line with ``time`` (ISO 8601, UTC, with its offset),
  ``level``, ``logger``, ``message`` and ``pid`` (of the process that wrote it), plus
  ``worker`` (the worker that wrote it, or the one a line of the primary is about, then
  with ``worker_pid``), the ``extra=`` fields of the record (the access log's ``method``,
  ``path``, ``status``, ``duration_ms``, ``client``, ``bytes``) and ``exc_info``.

What the app prints in a worker (``sys.stdout``, ``sys.stderr``) goes through
:func:`capture_output`: each line is prefixed with ``[w<id>]`` (text) or wrapped in a JSON
object (json), like ``pm2 logs``, and written to the worker's stderr, which is the
primary's stderr.
"""

from __future__ import annotations

import datetime
import io
import json
import logging
import os
import sys
import threading
from typing import Any, TextIO

# attributes every LogRecord has: anything else on a record came from ``extra=``
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", (), None)).keys() | {"message", "asctime"}
)
MAX_LINE = 64 * 1024
"""A line of app output longer than this is cut into pieces (each one a line)."""


def plural(count: int, noun: str) -> str:
    """``1 worker``, ``2 workers``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def iso_time(timestamp: float) -> str:
    """ISO 8601 in UTC with its offset and milliseconds: ``2026-01-01T12:00:00.123+00:00``."""
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds")


def json_line(level: str, logger: str, message: str, **fields: Any) -> str:
    """One log line as a JSON object (no newline in it: JSON escapes them)."""
    import time

    data: dict[str, Any] = {
        "time": iso_time(time.time()),
        "level": level,
        "logger": logger,
        "message": message,
        "pid": os.getpid(),
    }
    data.update(fields)
    return json.dumps(data, default=str, ensure_ascii=False)


class JSONFormatter(logging.Formatter):
    """A record as one JSON object; ``worker`` is added to every record of a worker."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "time": iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if self.worker is not None:
            data["worker"] = self.worker
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            data["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(data, default=str, ensure_ascii=False)


class HerdHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The stderr handler trioherd installs (told apart from the app's own handlers, so
    that a second set-up replaces it)."""


def setup_logging(
    level: str, tag: str, log_format: str = "text", worker: int | None = None
) -> logging.Handler:
    """Send the ``trioherd`` loggers to stderr in ``log_format``; the handler, which
    replaces one an earlier call installed."""
    root = logging.getLogger("trioherd")
    for handler in list(root.handlers):
        if isinstance(handler, HerdHandler):
            root.removeHandler(handler)
    handler = HerdHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter(worker))
    else:
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s trioherd[{tag}] %(levelname)s %(message)s")
        )
    root.addHandler(handler)
    root.setLevel(level.upper())
    root.propagate = False
    return handler


def announce(message: str, log_format: str, level: str = "info", **fields: Any) -> None:
    """A line of the command line's own on stderr: ``trioherd: MESSAGE`` (text), or a
    JSON object (json) whose ``message`` is MESSAGE."""
    if log_format == "json":
        line = json_line(level, "trioherd", message, **fields)
    else:
        line = f"trioherd: {message}"
    print(line, file=sys.stderr, flush=True)


class LineWriter(io.TextIOBase):
    """A text stream that writes each complete line to ``target`` prefixed with the
    worker's tag (text) or as a JSON object (json). A partial line waits for its end, or
    for ``flush()``."""

    def __init__(self, target: TextIO, stream: str, worker: int, log_format: str) -> None:
        super().__init__()
        self._target = target
        self._stream = stream
        self._worker = worker
        self._json = log_format == "json"
        self._pending = ""
        self._lock = threading.Lock()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return self._target.encoding

    @property
    def errors(self) -> str | None:  # type: ignore[override]
        return self._target.errors

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return self._target.isatty()

    def fileno(self) -> int:  # faulthandler and the like write to the fd itself
        return self._target.fileno()

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        with self._lock:
            pending = self._pending + text
            lines = pending.split("\n")
            self._pending = lines.pop()
            if len(self._pending) > MAX_LINE:
                lines.append(self._pending)
                self._pending = ""
            if lines:
                self._emit(lines)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            if self._pending:
                self._emit([self._pending])
                self._pending = ""
        self._target.flush()

    def _emit(self, lines: list[str]) -> None:
        if self._json:
            out = [
                json_line("info", "app", line, worker=self._worker, stream=self._stream)
                for line in lines
            ]
        else:
            out = [f"[w{self._worker}] {line}" for line in lines]
        self._target.write("\n".join(out) + "\n")
        self._target.flush()


def capture_output(worker: int, log_format: str) -> None:
    """In a worker: what the app prints to ``sys.stdout`` or ``sys.stderr`` becomes lines
    tagged with the worker id on stderr. File descriptor 1 is pointed at stderr too, so
    what C code writes to stdout goes there as well (untagged)."""
    target = sys.stderr
    try:
        sys.stdout.flush()
        os.dup2(target.fileno(), 1)
    except (OSError, ValueError):  # no usable stdout or stderr fd: Python's streams only
        pass
    sys.stdout = LineWriter(target, "stdout", worker, log_format)
    sys.stderr = LineWriter(target, "stderr", worker, log_format)
