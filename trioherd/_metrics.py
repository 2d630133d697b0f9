"""Prometheus metrics of the whole herd, served by the primary on ``--metrics-bind``.

Workers send their counters to the primary with every heartbeat (about once a second), so
one scrape covers every worker, including the ones that exited since the last scrape:
counters of an exited worker are folded into the totals, never lost.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio

from ._config import parse_host_port
from ._errors import ConfigError

if TYPE_CHECKING:
    from ._primary import Herd

log = logging.getLogger("trioherd.metrics")

MAX_HEAD = 8192
READ_TIMEOUT = 5.0


def render(herd: Herd) -> str:
    totals = herd.totals()
    lines = [
        "# HELP trioherd_requests_total HTTP requests served by the herd, by status class.",
        "# TYPE trioherd_requests_total counter",
    ]
    status = totals["status"]
    for key in ("1xx", "2xx", "3xx", "4xx", "5xx"):
        lines.append(f'trioherd_requests_total{{status="{key}"}} {status.get(key, 0)}')
    lines += [
        "# HELP trioherd_bytes_received_total Bytes received from clients.",
        "# TYPE trioherd_bytes_received_total counter",
        f"trioherd_bytes_received_total {totals['bytes_in']}",
        "# HELP trioherd_bytes_sent_total Bytes sent to clients.",
        "# TYPE trioherd_bytes_sent_total counter",
        f"trioherd_bytes_sent_total {totals['bytes_out']}",
        "# HELP trioherd_connections_open Connections open in the workers now.",
        "# TYPE trioherd_connections_open gauge",
        f"trioherd_connections_open {totals['connections']}",
        "# HELP trioherd_connections_moved_total Connections taken back from a worker that"
        " could not take them (slow, hung, dead) and passed to another.",
        "# TYPE trioherd_connections_moved_total counter",
        f"trioherd_connections_moved_total {herd.handoff.moved}",
        "# HELP trioherd_connections_dropped_total Connections closed unanswered (only when"
        " a stopping herd had no worker left for one).",
        "# TYPE trioherd_connections_dropped_total counter",
        f"trioherd_connections_dropped_total {herd.handoff.dropped}",
        "# HELP trioherd_workers Worker slots the herd keeps.",
        "# TYPE trioherd_workers gauge",
        f"trioherd_workers {herd.size}",
        "# HELP trioherd_reloads_total Rolling reloads started.",
        "# TYPE trioherd_reloads_total counter",
        f"trioherd_reloads_total {herd.reloads}",
        "# HELP trioherd_respawns_total Workers replaced, by cause.",
        "# TYPE trioherd_respawns_total counter",
    ]
    causes = {"crash", "boot", "timeout", "signal", "max-requests", "max-memory"}
    for cause in sorted(causes | set(herd.respawns)):
        label = cause.replace(" ", "-")
        lines.append(f'trioherd_respawns_total{{cause="{label}"}} {herd.respawns.get(cause, 0)}')
    lines += [
        "# HELP trioherd_worker_requests Requests served by each live worker.",
        "# TYPE trioherd_worker_requests gauge",
    ]
    workers = herd.workers
    for worker in workers:
        lines.append(
            f'trioherd_worker_requests{{slot="{worker.slot.index}",pid="{worker.pid}"}} '
            f"{worker.requests}"
        )
    lines += [
        "# HELP trioherd_worker_rss_bytes Resident memory of each live worker.",
        "# TYPE trioherd_worker_rss_bytes gauge",
    ]
    for worker in workers:
        lines.append(
            f'trioherd_worker_rss_bytes{{slot="{worker.slot.index}",pid="{worker.pid}"}} '
            f"{worker.rss()}"
        )
    return "\n".join(lines) + "\n"


async def serve_metrics(
    herd: Herd, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    assert herd.config.metrics_bind is not None
    host, port = parse_host_port(herd.config.metrics_bind, "metrics_bind")

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            head = b""
            with trio.move_on_after(READ_TIMEOUT):
                while b"\r\n\r\n" not in head and len(head) < MAX_HEAD:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    head += chunk
            if b"\r\n\r\n" not in head:
                return
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if path.split(b"?")[0] == b"/metrics":
                body = render(herd).encode()
                status = b"200 OK"
                ctype = b"text/plain; version=0.0.4; charset=utf-8"
            else:
                body, status, ctype = b"not found\n", b"404 Not Found", b"text/plain"
            response = (
                b"HTTP/1.1 "
                + status
                + b"\r\ncontent-type: "
                + ctype
                + b"\r\ncontent-length: "
                + str(len(body)).encode()
                + b"\r\nconnection: close\r\n\r\n"
                + body
            )
            try:
                await stream.send_all(response)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ConfigError("metrics_bind", f"{herd.config.metrics_bind}: {exc.strerror}") from None
    sockname = listeners[0].socket.getsockname()
    shown = f"[{sockname[0]}]" if ":" in sockname[0] else sockname[0]
    url = f"http://{shown}:{sockname[1]}/metrics"
    log.info("metrics on %s", url)
    task_status.started(url)
    await trio.serve_listeners(handle, listeners)
