"""Prometheus metrics of the whole herd, served by the primary on ``--metrics-bind``.

Workers send their counters to the primary with every heartbeat (about once a second), so
one scrape covers every worker, including the ones that exited since the last scrape:
counters of an exited worker are folded into the totals, never lost.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from .. import _ipc
from .._config import parse_host_port
from .._errors import ConfigError
from .process import WorkerState

if TYPE_CHECKING:
    from .herd import Herd

log = logging.getLogger("trioherd.metrics")

MAX_HEAD = 8192
READ_TIMEOUT = 5.0


def _metric(name: str, kind: str, help_text: str, samples: list[tuple[str, Any]]) -> list[str]:
    """One metric family in the text format: its HELP and TYPE lines, then a line per
    (labels, value) sample (labels as ``a="1",b="2"``, or empty)."""
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        lines.append(f"{name}{{{labels}}} {value}" if labels else f"{name} {value}")
    return lines


def render(herd: Herd) -> str:
    totals = herd.totals()
    status = totals[_ipc.STATUS]
    causes = {"crash", "boot", "timeout", "signal", "max-requests", "max-memory"}
    respawns = [
        (f'cause="{cause.replace(" ", "-")}"', herd.respawns.get(cause, 0))
        for cause in sorted(causes | set(herd.respawns))
    ]
    return (
        "\n".join(
            [
                *_metric(
                    "trioherd_requests_total",
                    "counter",
                    "HTTP requests served by the herd, by status class.",
                    [(f'status="{key}"', status.get(key, 0)) for key in _ipc.STATUS_CLASSES],
                ),
                *_metric(
                    "trioherd_bytes_received_total",
                    "counter",
                    "Bytes received from clients.",
                    [("", totals["bytes_in"])],
                ),
                *_metric(
                    "trioherd_bytes_sent_total",
                    "counter",
                    "Bytes sent to clients.",
                    [("", totals["bytes_out"])],
                ),
                *_connection_lines(herd, totals),
                *_websocket_lines(herd, totals),
                *_metric(
                    "trioherd_workers", "gauge", "Worker slots the herd keeps.", [("", herd.size)]
                ),
                *_reload_lines(herd),
                *_metric(
                    "trioherd_respawns_total", "counter", "Workers replaced, by cause.", respawns
                ),
                *_worker_lines(herd),
            ]
        )
        + "\n"
    )


def _connection_lines(herd: Herd, totals: dict[str, Any]) -> list[str]:
    """Connections open now, shed and cut by the workers, moved and dropped by the
    hand-off."""
    cuts = totals[_ipc.CUTS]
    return [
        *_metric(
            "trioherd_connections_open",
            "gauge",
            "Connections open in the workers now.",
            [("", totals["connections"])],
        ),
        *_metric(
            "trioherd_connections_shed_total",
            "counter",
            "Idle keep-alive connections closed to make room near --max-connections.",
            [("", totals["shed"])],
        ),
        *_metric(
            "trioherd_connections_cut_total",
            "counter",
            "Connections the workers cut, by reason: head, body and send timeouts, shed,"
            " size limits, WebSocket ping timeouts, refused PROXY headers.",
            [(f'reason="{reason}"', cuts.get(reason, 0)) for reason in _ipc.CUT_REASONS],
        ),
        *_metric(
            "trioherd_connections_moved_total",
            "counter",
            "Connections taken back from a worker that could not take them (slow, hung,"
            " dead) and passed to another.",
            [("", herd.handoff.moved)],
        ),
        *_metric(
            "trioherd_connections_dropped_total",
            "counter",
            "Connections closed unanswered (only when a stopping herd had no worker left"
            " for one).",
            [("", herd.handoff.dropped)],
        ),
    ]


def _worker_lines(herd: Herd) -> list[str]:
    """Requests and resident memory of each live worker."""
    workers = herd.workers
    labels = [f'slot="{worker.slot.index}",pid="{worker.pid}"' for worker in workers]
    return [
        *_metric(
            "trioherd_worker_requests",
            "gauge",
            "Requests served by each live worker.",
            [(label, worker.requests) for label, worker in zip(labels, workers, strict=True)],
        ),
        *_metric(
            "trioherd_worker_rss_bytes",
            "gauge",
            "Resident memory of each live worker.",
            [(label, worker.rss()) for label, worker in zip(labels, workers, strict=True)],
        ),
    ]


def _reload_lines(herd: Herd) -> list[str]:
    """Rolling reloads: those that succeeded, and those a replacement failed."""
    return [
        *_metric(
            "trioherd_reloads_total",
            "counter",
            "Rolling reloads that succeeded.",
            [("", herd.reloads)],
        ),
        *_metric(
            "trioherd_reloads_failed_total",
            "counter",
            "Rolling reloads stopped by a replacement that could not boot (the old workers"
            " kept serving).",
            [("", herd.reloads_failed)],
        ),
    ]


def _websocket_lines(herd: Herd, totals: dict[str, Any]) -> list[str]:
    """The WebSocket gauge and counters (each open WebSocket is also an open connection)."""
    websockets = sum(int(worker.stats.get("websockets", 0)) for worker in herd.workers)
    return [
        *_metric(
            "trioherd_websockets_open",
            "gauge",
            "WebSockets open in the workers now.",
            [("", websockets)],
        ),
        *_metric(
            "trioherd_websocket_messages_total",
            "counter",
            "WebSocket messages received (in) and sent (out).",
            [
                ('direction="in"', totals["ws_messages_in"]),
                ('direction="out"', totals["ws_messages_out"]),
            ],
        ),
    ]


def readiness(herd: Herd) -> str | None:
    """Why the herd should get no traffic now (a one-line reason), or None if it is ready:
    at least one worker is ready and taking connections, and the herd is not stopping."""
    if herd.stopping:
        return "stopping"
    serving = [
        w
        for w in herd.workers
        if w.state is WorkerState.READY and herd.handoff.is_dispatching_to(w)
    ]
    if not serving:
        return "no worker is ready to take connections"
    return None


def answer(herd: Herd, path: bytes) -> tuple[bytes, bytes, bytes]:
    """(body, status line, content type) for a GET of ``path`` on the metrics listener:
    /metrics, /livez (200 while the primary runs), /readyz (200 or 503 with the reason)."""
    text = b"text/plain; charset=utf-8"
    if path == b"/metrics":
        return render(herd).encode(), b"200 OK", b"text/plain; version=0.0.4; charset=utf-8"
    if path == b"/livez":
        return b"ok\n", b"200 OK", text
    if path == b"/readyz":
        reason = readiness(herd)
        if reason is None:
            ready = sum(1 for w in herd.workers if w.state is WorkerState.READY)
            return f"ready: {ready} of {herd.size} workers\n".encode(), b"200 OK", text
        return f"not ready: {reason}\n".encode(), b"503 Service Unavailable", text
    return b"not found\n", b"404 Not Found", text


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
            body, status, ctype = answer(herd, path.split(b"?")[0])
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
