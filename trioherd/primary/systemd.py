"""systemd's sd_notify protocol: READY=1 once every worker is ready, RELOADING=1 while a
rolling reload runs, STOPPING=1 when a graceful stop starts. Only when systemd set
NOTIFY_SOCKET (Type=notify or Type=notify-reload units); otherwise nothing is sent."""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("trioherd.systemd")

_MESSAGES = {
    "ready": "READY=1\nSTATUS=serving",
    "reloading": "RELOADING=1\nSTATUS=reloading",
    "stopping": "STOPPING=1\nSTATUS=stopping",
}


class Notifier:
    def __init__(self, address: str | None) -> None:
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address

    def __call__(self, state: str) -> None:
        message = _MESSAGES.get(state)
        if not self.address or message is None:
            return
        if state == "reloading":
            message += f"\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
        message += f"\nMAINPID={os.getpid()}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.sendto(message.encode(), self.address)
            except OSError as exc:
                log.warning("sd_notify to %s failed: %s", self.address, exc)
