"""Listening sockets of the primary: TCP, Unix, inherited fds and systemd LISTEN_FDS."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import socket
import stat
import struct
from collections.abc import MutableMapping

import attrs

from ._config import DEFAULT_BIND, Config, parse_host_port
from ._errors import ConfigError

log = logging.getLogger("trioherd.accept")

BACKLOG = 65535
"""The listen backlog asked for; Linux caps it at ``net.core.somaxconn`` (4096 on current
kernels). As deep an accept queue as the system allows: a burst of new connections waits
there, served in turn, where a shallow one makes clients retry their SYN a second or
three later (10,000 connections at once: the last answered after 2-3 s with 2048,
0.5-1 s with 4096; docs/reliability.md)."""
SD_LISTEN_FDS_START = 3


@attrs.define(eq=False)
class Listener:
    sock: socket.socket
    url: str
    uds_path: str | None = None

    def close(self) -> None:
        if self.sock.fileno() < 0:
            return  # closed already (the path may belong to someone else by now)
        self.sock.close()
        if self.uds_path:
            with contextlib.suppress(OSError):
                os.unlink(self.uds_path)


def _url(sock: socket.socket, tls: bool) -> str:
    scheme = "https" if tls else "http"
    if sock.family == socket.AF_UNIX:
        return f"{scheme}+unix:{sock.getsockname()}"
    host, port = sock.getsockname()[:2]
    if sock.family == socket.AF_INET6:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port}"


def open_tcp(address: str, tls: bool) -> Listener:
    host, port = parse_host_port(address, "bind")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError("bind", f"{address}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepts
        sock.bind(sockaddr)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError("bind", f"{address}: {exc.strerror}") from None
    sock.setblocking(False)
    return Listener(sock, _url(sock, tls))


DEFER_ACCEPT_SECONDS = 1
"""TCP_DEFER_ACCEPT: how long the kernel keeps a connection that sends nothing before it
hands it over anyway (rounded to its SYN-ACK retransmissions: 1 s)."""


def defer_accept(listener: Listener, on: bool) -> None:
    """Let the kernel hand over a TCP connection only once its first bytes came (a client
    that speaks first: HTTP, TLS, PROXY). No effect on Unix sockets or off Linux."""
    sock = listener.sock
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS if on else 0)


def unix_socket_in_use(path: str) -> bool:
    """True if a server listens on the Unix socket ``path``; a stale socket file (its
    server died without removing it) is removed and False returned."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return False
    except FileNotFoundError:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            return False
    return True


def open_unix(path: str, tls: bool) -> Listener:
    if unix_socket_in_use(path):
        raise ConfigError("uds", f"{path}: another server is listening there")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        raise ConfigError("uds", f"{path}: {exc.strerror}") from None
    sock.setblocking(False)
    return Listener(sock, _url(sock, tls), uds_path=path)


def adopt_fd(fd: int, tls: bool, option: str = "fd") -> Listener:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(option, f"fd {fd}: {exc.strerror}") from None
    try:
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise ConfigError(option, f"fd {fd} is not a socket") from exc
    if not listening or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise ConfigError(option, f"fd {fd} is not a listening stream socket")
    sock.set_inheritable(False)
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepts
    return Listener(sock, _url(sock, tls))


def systemd_fds(environ: MutableMapping[str, str]) -> list[int]:
    """fds passed by systemd socket activation; the variables are removed so that no child
    mistakes them for its own."""
    if environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(key, None)
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count))


def open_listeners(config: Config) -> list[Listener]:
    listeners: list[Listener] = []
    try:
        for fd in config.fd:
            listeners.append(adopt_fd(fd, config.tls))
        if config.listen_fds:
            for fd in systemd_fds(os.environ):
                listeners.append(adopt_fd(fd, config.tls, "LISTEN_FDS"))
        for path in config.uds:
            listeners.append(open_unix(path, config.tls))
        binds = config.bind or (() if listeners else (DEFAULT_BIND,))
        for address in binds:
            listeners.append(open_tcp(address, config.tls))
    except BaseException:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def raise_open_files_limit() -> int:
    """Raise this process's soft limit of open files to its hard limit (the default soft
    limit of 1024 would cap a worker near 1,000 connections, whatever --max-connections
    says). Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    return soft


_QUEUED = struct.Struct("I")
_QUEUED_AT = 24  # struct tcp_info: tcpi_unacked, the accept queue's length on a listener


def queued_connections(sock: socket.socket) -> int:
    """How many connections wait in a TCP listener's accept queue (Linux reports it in
    ``tcpi_unacked`` for a listening socket); 0 if it cannot be told. Knowing it spares
    the accept() that only says EAGAIN (about 5 us) at the end of every round."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _QUEUED_AT + 4)
    except OSError:
        return 0
    if len(info) < _QUEUED_AT + 4:
        return 0
    return int(_QUEUED.unpack_from(info, _QUEUED_AT)[0])


def accept_fd(sock: socket.socket) -> tuple[int | None, bool]:
    """Accept one connection as a raw fd, no socket object: ``(fd, False)``;
    ``(None, False)`` when none is waiting; ``(None, True)`` after an error that passes
    (out of fds, memory, or an aborted connection; logged): pause a moment, then go on."""
    try:
        fd, _ = sock._accept()  # type: ignore[attr-defined]
    except BlockingIOError:
        return None, False
    except OSError as exc:
        if not is_transient_accept_error(exc):
            raise
        log.warning("accept failed: %s", exc)
        return None, True
    return fd, False


def is_transient_accept_error(exc: OSError) -> bool:
    return exc.errno in (
        errno.ECONNABORTED,
        errno.EPROTO,
        errno.EPERM,
        errno.ENOBUFS,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
    )
