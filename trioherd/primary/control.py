"""The control socket: ``trioherd status|reload|scale|stop`` talk to a running primary.

Where: ``$XDG_RUNTIME_DIR/trioherd/NAME.sock``, else ``<tmp>/trioherd-<uid>/NAME.sock``; the
directory is mode 0700 and the socket 0600, so only the herd's user can steer it.
A live socket with the same name means another herd runs: refused. A dead one is removed.

Protocol: the client sends one JSON object on a line (``{"cmd": "status"}``), the primary
answers one JSON object on a line and closes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import tempfile
from typing import TYPE_CHECKING, Any

import trio

from .._errors import ConfigError, ReloadError
from .._listeners import unix_socket_in_use

if TYPE_CHECKING:
    from .herd import Herd

log = logging.getLogger("trioherd.control")

MAX_REQUEST = 64 * 1024
REQUEST_TIMEOUT = 10.0


def control_dir() -> str:
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "trioherd")
    return os.path.join(tempfile.gettempdir(), f"trioherd-{os.getuid()}")


def socket_path(name: str) -> str:
    return os.path.join(control_dir(), f"{name}.sock")


def _private_dir(path: str) -> None:
    os.makedirs(path, mode=0o700, exist_ok=True)
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        raise ConfigError("name", f"{path} is not a directory of this user")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)


class ControlServer:
    def __init__(self, path: str, sock: socket.socket) -> None:
        self.path = path
        self.sock = sock
        self._inode = os.stat(path).st_ino

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)


def bind_control_socket(name: str, directory: str | None = None) -> tuple[str, socket.socket]:
    directory = directory or control_dir()
    _private_dir(directory)
    path = os.path.join(directory, f"{name}.sock")
    if unix_socket_in_use(path):  # a stale socket (its herd is gone) is removed
        raise ConfigError("name", f"a herd named {name!r} is already running ({path})")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ConfigError("name", f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    return path, sock


async def start_control_server(herd: Herd, nursery: trio.Nursery) -> ControlServer:
    path, sock = bind_control_socket(herd.config.name, herd.config.control_dir)
    server = ControlServer(path, sock)
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            request = None
            with trio.move_on_after(REQUEST_TIMEOUT):
                request = await _read_line(stream)
            if request is None:
                return
            reply = await handle_request(herd, request, nursery)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(reply).encode() + b"\n")

    nursery.start_soon(trio.serve_listeners, handler, [listener])
    return server


async def _read_line(stream: trio.abc.ReceiveStream) -> dict[str, Any] | None:
    buffer = b""
    while b"\n" not in buffer and len(buffer) < MAX_REQUEST:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buffer += chunk
    try:
        request = json.loads(buffer.split(b"\n", 1)[0] or b"null")
    except ValueError:
        return None
    return request if isinstance(request, dict) else None


def status(herd: Herd) -> dict[str, Any]:
    return {
        "pid": herd.pid,
        "name": herd.config.name,
        "listeners": herd.addresses,
        "dispatch": herd.config.dispatch,
        "size": herd.size,
        "reloads": herd.reloads,
        "reloads_failed": herd.reloads_failed,
        "generation": herd.generation,
        "preload": herd.generations.preload,
        "molds": herd.generations.describe(),
        "workers": [
            {**worker.as_dict(), "websockets": int(worker.stats.get("websockets", 0))}
            for worker in herd.workers
        ],
        "backoff": [
            {"slot": slot.index, "restarts": slot.restarts}
            for slot in herd.slots
            if slot.backoff_until is not None
        ],
    }


async def handle_request(
    herd: Herd, request: dict[str, Any], nursery: trio.Nursery
) -> dict[str, Any]:
    command = request.get("cmd")
    try:
        if command == "status":
            return {"ok": True, "status": status(herd)}
        if command == "reload":
            await herd.reload()
            return {"ok": True, "workers": [w.pid for w in herd.workers]}
        if command == "scale":
            target = _scale_target(herd.size, request.get("n"))
            await herd.scale(target)
            return {"ok": True, "size": herd.size}
        if command == "stop":
            nursery.start_soon(herd.stop)
            return {"ok": True, "pid": herd.pid}
    except ReloadError as exc:
        return {"ok": False, "error": f"reload failed: {exc}"}
    except ValueError as exc:  # a bad argument (scale): a usage error
        return {"ok": False, "error": str(exc), "usage": True}
    return {"ok": False, "error": f"unknown command {command!r}"}


def _scale_target(current: int, spec: Any) -> int:
    text = str(spec).strip()
    try:
        number = int(text)
    except ValueError:
        raise ValueError(f"scale: expected N, +N or -N, got {spec!r}") from None
    target = current + number if text[:1] in "+-" else number
    if target < 1:
        raise ValueError(f"scale: a herd needs at least one worker (asked for {target})")
    return target


def request(name: str, message: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Client side: send one command to the herd ``name`` and return its answer."""
    path = socket_path(name)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        raise ConnectionError(
            f"no herd named {name!r} is running ({path}: {exc.strerror})"
        ) from None
    with sock:
        sock.sendall(json.dumps(message).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    try:
        reply = json.loads(data)
    except ValueError:
        raise ConnectionError(f"herd {name!r} gave no answer") from None
    if not isinstance(reply, dict):
        raise ConnectionError(f"herd {name!r} gave a malformed answer")
    return reply
