"""The mold (``--preload``): a template process that imports the app once, before any event
loop runs, and forks the herd's workers from it on the primary's request.

The primary starts it as it starts a worker, from its main thread::

    python -c "import trioherd.worker.mold as m; m.main()" --ctl N --news M --ppid P

1. It dies with the primary (PR_SET_PDEATHSIG, checked against ``--ppid``).
2. It reads its ``mold`` message (the herd's config, its generation) on ``--ctl``.
3. With the collector off, it imports the app (``apps.loading``: what a worker's boot
   would import, and trioherd's worker side with it), then ``gc.freeze()``: the objects the
   import made are never touched by a collection again, so the pages that hold them stay
   shared with every worker. It says ``ready`` on ``--news``; or ``boot_error`` with the
   app's traceback, and exits 3.
4. It answers ``fork`` requests on ``--ctl``: each brings the two channel ends of a new
   worker (SCM_RIGHTS). It forks, answers ``forked`` with the child's pid and a pidfd of
   it, and closes its copies of the ends. The pidfd is taken before anyone could reap the
   child, so it names that process and no other: the primary signals the worker and sees
   it end through it, although the worker is the mold's child, not its own.
5. It reaps its children and says how each ended (``exited``, with the exit code, or minus
   the signal) on ``--news``.
6. It exits when the primary closes ``--ctl``, which it does once no worker of this
   generation is left.

The forked child closes what is the mold's (its two channels, the pidfds of its siblings),
turns the collector on, and runs the worker's ``main`` as a spawned worker does: its own
event loop, its ``init``, lifespan startup, ``ready``. The worker's import of the app finds
the module the mold imported in ``sys.modules``: the child runs that generation's code,
whatever is on disk now. Its death signal is set towards the mold (``--ppid`` is the
mold's pid), and the mold's is towards the primary: if the primary dies, the kernel kills
the mold, and with it every worker forked from it.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import NoReturn

from .. import _ipc
from .._config import Config
from .._errors import ConfigError, IPCProtocolError
from .._log import setup_logging
from ..apps import loading as _app
from . import main as _worker
from .base import app_traceback, boot_failed, set_parent_death_signal

log = logging.getLogger("trioherd.mold")

FORK_FDS = 2
"""A ``fork`` request brings the new worker's control and connection channel ends."""


class Mold:
    """The mold's loop: fork requests on ``ctl``, children's exits, until ``ctl`` ends."""

    def __init__(self, ctl: socket.socket, news: socket.socket) -> None:
        self.ctl = ctl
        self.news = news
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.poller = select.poll()  # no fd of its own: nothing for a child to close
        self.poller.register(ctl, select.POLLIN)

    def serve(self) -> None:
        while True:
            for fd, _ in self.poller.poll():
                if fd == self.ctl.fileno():
                    if not self.answer():
                        return
                elif fd in self.children:
                    self.reap(fd)

    def answer(self) -> bool:
        """Serve one request; False when the primary closed its end."""
        try:
            data, fds, _, _ = socket.recv_fds(
                self.ctl, _ipc.MAX_PACKET, FORK_FDS, socket.MSG_CMSG_CLOEXEC
            )
        except OSError:
            return False
        if not data:
            _ipc.close_fds(fds)
            return False
        try:
            message = _ipc.decode(data)
            if message["t"] != "fork" or len(fds) != FORK_FDS:
                raise IPCProtocolError(f"expected a fork request with {FORK_FDS} fds")
        except IPCProtocolError as exc:
            _ipc.close_fds(fds)
            self.reply(0, f"bad request: {exc}")
            return True
        self.fork(message["id"], fds)
        return True

    def reply(self, pid: int, error: str = "", pidfd: int | None = None) -> None:
        data = _ipc.encode("forked", pid=pid, error=error)
        socket.send_fds(self.ctl, [data], [] if pidfd is None else [pidfd])

    def fork(self, worker_id: int, fds: list[int]) -> None:
        gc.freeze()  # what the mold made since its import: kept out of the children's way
        mold_pid = os.getpid()
        try:
            pid = os.fork()
        except OSError as exc:
            _ipc.close_fds(fds)
            self.reply(0, f"fork failed: {exc}")
            return
        if pid == 0:
            self.become_worker(mold_pid, fds)
        _ipc.close_fds(fds)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc:  # out of fds: a worker the primary could not watch
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            self.reply(0, f"pidfd_open failed: {exc}")
            return
        self.children[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)
        log.debug("forked worker %d (pid %d)", worker_id, pid)
        self.reply(pid, pidfd=pidfd)

    def become_worker(self, mold_pid: int, fds: list[int]) -> NoReturn:
        """In the forked child: drop what is the mold's, and run a worker (never return to
        the mold's loop: SystemExit unwinds it, so the interpreter exits as a spawned
        worker's does, atexit handlers and all)."""
        for pidfd in self.children:
            os.close(pidfd)
        self.ctl.close()
        self.news.close()
        gc.enable()
        fd, conn_fd = fds
        _worker.main(["--fd", str(fd), "--conn-fd", str(conn_fd), "--ppid", str(mold_pid)])
        raise SystemExit(0)

    def reap(self, pidfd: int) -> None:
        pid = self.children.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        _, status = os.waitpid(pid, 0)
        tell(self.news, _ipc.encode("exited", pid=pid, code=os.waitstatus_to_exitcode(status)))


def tell(news: socket.socket, data: bytes) -> None:
    """A message to the primary; if it is gone, so are we (its death signal is on its way)."""
    try:
        news.send(data)
    except OSError:
        os._exit(1)


def import_app(config: Config, news: socket.socket) -> None:
    """Import the app as a worker's boot would (its interface told apart too, so an app a
    worker would refuse is refused here); on failure, say why and exit 3."""
    try:
        app = _app.load(config.app or "trioherd._demo:app")
        _app.detect_interface(app, config.interface)
    except ConfigError as exc:
        boot_failed(news, f"trioherd: error: {exc}")
    except BaseException as exc:
        boot_failed(news, app_traceback(exc))


def read_config(ctl: socket.socket) -> tuple[Config, int]:
    """The herd's config and this mold's generation, from the first message."""
    try:
        message = _ipc.decode(ctl.recv(_ipc.MAX_PACKET))
        if message["t"] != "mold" or message["v"] != _ipc.PROTOCOL_VERSION:
            raise IPCProtocolError(f"expected a mold message of v{_ipc.PROTOCOL_VERSION}")
        return Config.from_wire(message["config"]), int(message["generation"])
    except (OSError, IPCProtocolError) as exc:
        sys.stderr.write(f"trioherd mold: no valid config from the primary: {exc}\n")
        os._exit(1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="trioherd.worker.mold")
    parser.add_argument("--ctl", type=int, required=True)
    parser.add_argument("--news", type=int, required=True)
    parser.add_argument("--ppid", type=int, required=True)
    args = parser.parse_args(argv)
    set_parent_death_signal(args.ppid)  # the primary's main thread spawned us
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C is the primary's to handle
    ctl = socket.socket(fileno=args.ctl)
    news = socket.socket(fileno=args.news)
    config, generation = read_config(ctl)
    setup_logging(config.log_level, f"mold{generation}", config.log_format)
    began = time.monotonic()
    gc.disable()  # no collection between the import and the forks: no holes in its pages
    import_app(config, news)
    gc.freeze()
    log.debug("imported the app in %.2fs", time.monotonic() - began)
    tell(news, _ipc.encode("ready", v=_ipc.PROTOCOL_VERSION, pid=os.getpid()))
    Mold(ctl, news).serve()
