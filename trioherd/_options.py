"""The user-facing options, in groups by what they govern; :class:`~trioherd._config.Config`
is made of these groups.

Each option is a field whose metadata (:func:`option`) carries its kind, help text,
choices and minimum, so its default is written once, in the field, and the CLI flag, the
``TRIOHERD_<OPTION>`` variable and the TOML key are derived from it (``_config.OPTIONS``).
The groups are frozen attrs classes with keyword-only fields: a base of Config adds its
fields to Config's ``__init__``. What a value must be is checked in ``_config``, once,
when a Config is built.
"""

from __future__ import annotations

import os
from typing import Any

import attrs

from .protocols.forwarded import FAMILIES, X_FORWARDED

DISPATCH_POLICIES = ("round-robin", "least-busy", "shared")
INTERFACES = ("auto", "native", "asgi", "wsgi", "stream")
CLIENT_CERT_MODES = ("none", "optional", "required")
TLS_VERSIONS = ("1.2", "1.3")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
WS_MODES = ("auto", "wsproto", "none")
HTTP_PARSERS = ("auto", "h11", "httptools")
LOOPS = ("auto", "asyncio", "uvloop", "trio-asyncio")
DEFAULT_BIND = "127.0.0.1:8000"
DEFAULT_THREADS = 32  # see docs/wsgi.md, "Threads": measured with blocking Flask views
KINDS = ("int", "float", "str", "bool", "list", "intlist", "choice")
OPTION_KEY = "trioherd.option"


@attrs.frozen
class OptionInfo:
    """What a Config field needs to be a user-facing option (kept in its metadata)."""

    kind: str  # one of KINDS
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None


def option(
    kind: str, help: str, *, choices: tuple[str, ...] = (), minimum: float | None = None
) -> dict[str, OptionInfo]:
    """Field metadata that makes a Config field a CLI flag, env var and TOML key."""
    assert kind in KINDS, kind
    assert (kind == "choice") == bool(choices), kind
    return {OPTION_KEY: OptionInfo(kind, help, choices, minimum)}


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _tuple_of_str(value: Any) -> tuple[str, ...]:
    return tuple(value)


def _tuple_of_int(value: Any) -> tuple[int, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True, slots=False)
class ListenOptions:
    """Where the herd listens, and how accepted connections reach the workers."""

    bind: tuple[str, ...] = attrs.field(
        default=(),
        converter=_tuple_of_str,
        metadata=option(
            "list",
            f"TCP address HOST:PORT to listen on (repeatable; default "
            f"{DEFAULT_BIND} when no other listener is given; port 0 picks a free port)",
        ),
    )
    uds: tuple[str, ...] = attrs.field(
        default=(),
        converter=_tuple_of_str,
        metadata=option("list", "Unix socket path to listen on (repeatable)"),
    )
    fd: tuple[int, ...] = attrs.field(
        default=(),
        converter=_tuple_of_int,
        metadata=option(
            "intlist",
            "inherited listening socket fd (repeatable; systemd "
            "LISTEN_FDS is picked up automatically)",
        ),
    )
    dispatch: str = attrs.field(
        default="round-robin",
        metadata=option("choice", "how connections reach workers", choices=DISPATCH_POLICIES),
    )
    defer_accept: bool = attrs.field(
        default=False,
        metadata=option(
            "bool",
            "serving HTTP on TCP, the kernel hands over a connection once its first bytes "
            "came (Linux TCP_DEFER_ACCEPT; a client that sends nothing waits about 1 s). "
            "Off by default: under a flood past the accept queue Linux holds a deferred "
            "client's request back for seconds and the connection may time out unanswered",
        ),
    )
    batch_primary: bool = attrs.field(
        default=True,
        metadata=option(
            "bool",
            "while the primary hands connections over, its wake-ups do not preempt a busy "
            "worker (Linux SCHED_BATCH for the primary alone): fewer context switches per "
            "new connection",
        ),
    )


@attrs.frozen(kw_only=True, slots=False)
class ProcessOptions:
    """The worker processes: how many, and how the primary supervises and replaces them."""

    name: str = attrs.field(
        default="default", metadata=option("str", "herd name: names the control socket")
    )
    workers: int = attrs.field(
        factory=available_cpus,
        metadata=option("int", "number of worker processes (default: CPUs available)", minimum=1),
    )
    graceful_timeout: float = attrs.field(
        default=30.0,
        metadata=option(
            "float",
            "seconds a disconnecting worker has to finish "
            "in-flight work before what is left is cancelled",
            minimum=0,
        ),
    )
    worker_timeout: float = attrs.field(
        default=30.0,
        metadata=option(
            "float",
            "seconds without a heartbeat from a worker's event loop before it is killed "
            "and replaced",
            minimum=0.1,
        ),
    )
    boot_timeout: float = attrs.field(
        default=60.0,
        metadata=option(
            "float",
            "seconds a new worker has to import the app and report ready",
            minimum=0.1,
        ),
    )
    max_boot_failures: int = attrs.field(
        default=3,
        metadata=option(
            "int",
            "consecutive worker deaths before ready that make the herd give up (exit 3)",
            minimum=1,
        ),
    )
    min_uptime: float = attrs.field(
        default=10.0,
        metadata=option(
            "float",
            "a worker that lived this long resets its slot's respawn back-off",
            minimum=0,
        ),
    )
    backoff_max: float = attrs.field(
        default=15.0,
        metadata=option("float", "cap in seconds of the exponential respawn back-off", minimum=0),
    )
    max_requests: int = attrs.field(
        default=0,
        metadata=option(
            "int", "requests a worker serves before it is replaced (0 = never)", minimum=0
        ),
    )
    max_requests_jitter: int = attrs.field(
        default=0,
        metadata=option("int", "random 0..N added to max-requests per worker", minimum=0),
    )
    max_memory: int = attrs.field(
        default=0,
        metadata=option(
            "int", "RSS in MiB past which a worker is replaced (0 = never)", minimum=0
        ),
    )


@attrs.frozen(kw_only=True, slots=False)
class AppOptions:
    """The app: how it is called, in which event loop, and reloading it when its files
    change (development)."""

    interface: str = attrs.field(
        default="auto",
        metadata=option("choice", "app interface (auto-detected by default)", choices=INTERFACES),
    )
    threads: int = attrs.field(
        default=DEFAULT_THREADS,
        metadata=option(
            "int",
            f"threads per worker that run a WSGI app's requests (default: {DEFAULT_THREADS}): "
            "the best measured for Flask views that block on I/O (docs/wsgi.md); a request "
            "that finds them all busy waits for one. Other interfaces use none",
            minimum=1,
        ),
    )
    root_path: str | None = attrs.field(
        default=None,
        metadata=option(
            "str",
            "the path prefix the app is mounted under behind a proxy (/api): a WSGI app "
            "gets it as SCRIPT_NAME, and the rest of the path as PATH_INFO",
        ),
    )
    asyncio: bool = attrs.field(
        default=False,
        metadata=option(
            "bool",
            "serve an asyncio ASGI app (Django, Quart, FastAPI on asyncpg) in workers whose "
            "event loop is asyncio's own (the asyncio runtime; see --loop)",
        ),
    )
    loop: str = attrs.field(
        default="auto",
        metadata=option(
            "choice",
            "the event loop of --asyncio workers: uvloop (trioherd[asyncio]), asyncio's "
            "own, or auto: uvloop when installed; trio-asyncio: the app in a Trio worker "
            "through trio-asyncio, slower, for an asyncio app with WebSockets",
            choices=LOOPS,
        ),
    )
    preload: bool = attrs.field(
        default=False,
        metadata=option(
            "bool",
            "import the app once, in a template process (a mold), and fork the workers from "
            "it: faster respawns, memory shared between workers, and every worker runs the "
            "same generation of the code; a reload makes a new mold (--reload turns it on)",
        ),
    )
    reload: bool = attrs.field(
        default=False,
        metadata=option(
            "bool",
            "watch the app's files and do a reload when one changes (development; implies "
            "--preload; needs trioherd[reload])",
        ),
    )
    reload_dir: tuple[str, ...] = attrs.field(
        default=(),
        converter=_tuple_of_str,
        metadata=option(
            "list", "directory to watch with --reload (repeatable; default: the current one)"
        ),
    )
    reload_include: tuple[str, ...] = attrs.field(
        default=("*.py",),
        converter=_tuple_of_str,
        metadata=option(
            "list",
            "glob of the files whose change triggers a reload (repeatable; replaces the "
            "default *.py)",
        ),
    )
    reload_exclude: tuple[str, ...] = attrs.field(
        default=(),
        converter=_tuple_of_str,
        metadata=option("list", "glob of files or directories --reload ignores (repeatable)"),
    )


@attrs.frozen(kw_only=True, slots=False)
class HTTPOptions:
    """HTTP/1.1 in the workers: the request parser, the timeouts and the limits."""

    http: str = attrs.field(
        default="auto",
        metadata=option(
            "choice",
            "request parser: httptools (llhttp) reads the heads of requests without a body, "
            "h11 the rest; h11 alone reads all; auto is httptools when installed "
            "(trioherd[httptools])",
            choices=HTTP_PARSERS,
        ),
    )
    keep_alive_timeout: float = attrs.field(
        default=5.0,
        metadata=option("float", "seconds an idle keep-alive connection is kept", minimum=0),
    )
    header_timeout: float = attrs.field(
        default=10.0,
        metadata=option(
            "float",
            "seconds to receive a whole request head once its "
            "first byte arrived (slowloris bound: 408, then close)",
            minimum=0.01,
        ),
    )
    send_timeout: float = attrs.field(
        default=30.0,
        metadata=option(
            "float",
            "seconds a response may go without the client taking any of it before the "
            "connection is closed (reset)",
            minimum=0.01,
        ),
    )
    max_header_size: int = attrs.field(
        default=16384,
        metadata=option("int", "bytes of request line + headers (431)", minimum=64),
    )
    max_header_count: int = attrs.field(
        default=100, metadata=option("int", "number of request headers (431)", minimum=1)
    )
    max_body_size: int = attrs.field(
        default=16 * 1024 * 1024,
        metadata=option("int", "bytes of request body (413)", minimum=0),
    )
    max_requests_per_connection: int = attrs.field(
        default=1000,
        metadata=option(
            "int",
            "requests served on one keep-alive connection before it is closed (0 = no limit)",
            minimum=0,
        ),
    )
    max_connections: int = attrs.field(
        default=10000,
        metadata=option(
            "int",
            "open connections per worker; near it, idle keep-alive connections are closed "
            "oldest first, and a full worker gets no new ones",
            minimum=1,
        ),
    )


@attrs.frozen(kw_only=True, slots=False)
class WebSocketOptions:
    """WebSocket (on wsproto) in the workers."""

    ws: str = attrs.field(
        default="auto",
        metadata=option(
            "choice",
            "WebSocket support (wsproto): auto or wsproto serves it, none serves upgrade "
            "requests as plain HTTP",
            choices=WS_MODES,
        ),
    )
    ws_max_size: int = attrs.field(
        default=16 * 1024 * 1024,
        metadata=option(
            "int", "bytes of one incoming WebSocket message (past it: close 1009)", minimum=1
        ),
    )
    ws_ping_interval: float = attrs.field(
        default=20.0,
        metadata=option(
            "float", "seconds between WebSocket pings to each client (0 = no pings)", minimum=0
        ),
    )
    ws_ping_timeout: float = attrs.field(
        default=20.0,
        metadata=option(
            "float",
            "seconds a WebSocket client has to answer a ping before it is dropped (0 = wait "
            "forever)",
            minimum=0,
        ),
    )
    ws_per_message_deflate: bool = attrs.field(
        default=True,
        metadata=option(
            "bool", "accept WebSocket permessage-deflate compression a client offers (RFC 7692)"
        ),
    )


@attrs.frozen(kw_only=True, slots=False)
class TLSOptions:
    """TLS, terminated in the workers."""

    certfile: str | None = attrs.field(
        default=None, metadata=option("str", "TLS certificate chain (PEM); enables HTTPS")
    )
    keyfile: str | None = attrs.field(
        default=None, metadata=option("str", "TLS private key (PEM)")
    )
    keyfile_password: str | None = attrs.field(
        default=None, metadata=option("str", "password of the TLS private key")
    )
    ca_certs: str | None = attrs.field(
        default=None, metadata=option("str", "CA bundle to verify client certificates with")
    )
    client_cert: str = attrs.field(
        default="none",
        metadata=option("choice", "client certificate verification", choices=CLIENT_CERT_MODES),
    )
    tls_handshake_timeout: float = attrs.field(
        default=10.0, metadata=option("float", "seconds for a TLS handshake", minimum=0.01)
    )
    tls_min_version: str = attrs.field(
        default="1.2",
        metadata=option("choice", "lowest TLS version accepted", choices=TLS_VERSIONS),
    )
    ssl_context_factory: str | None = None


@attrs.frozen(kw_only=True, slots=False)
class EdgeOptions:
    """What sits in front of the herd: the proxies whose word about a client is believed,
    and the balancers a stopping herd gives time to take it out of rotation."""

    forwarded_allow_ips: str = attrs.field(
        default="127.0.0.1,::1",
        metadata=option(
            "str",
            "peers whose forwarded headers (the family --forwarded-headers names) set the "
            "client address and scheme: comma list of IPs and CIDRs, * for all (Unix "
            "sockets are trusted)",
        ),
    )
    forwarded_headers: str = attrs.field(
        default=X_FORWARDED,
        metadata=option(
            "choice",
            "the family of forwarded headers read from a trusted peer: x-forwarded "
            "(X-Forwarded-For and X-Forwarded-Proto, as nginx, HAProxy, AWS ELB and Traefik "
            "set them) or forwarded (RFC 7239 Forwarded); the other family reaches the app "
            "untouched and is never applied",
            choices=FAMILIES,
        ),
    )
    proxy_protocol: bool = attrs.field(
        default=False,
        metadata=option(
            "bool",
            "connections from the peers in --proxy-protocol-allow-ips start with a PROXY "
            "protocol header (v1 or v2, as HAProxy's send-proxy); the client address comes "
            "from it",
        ),
    )
    proxy_protocol_allow_ips: str = attrs.field(
        default="127.0.0.1,::1",
        metadata=option(
            "str",
            "with --proxy-protocol, the peers whose PROXY headers are believed: comma list "
            "of IPs and CIDRs, * for all (Unix sockets are allowed); another peer's "
            "connection is served as it is, and closed unanswered if it starts with a PROXY "
            "header",
        ),
    )
    drain_delay: float = attrs.field(
        default=0.0,
        metadata=option(
            "float",
            "seconds a graceful stop keeps the listeners accepting and serving after "
            "/readyz turned 503, so that balancers take the herd out of rotation first; "
            "then the listeners close and the workers drain",
            minimum=0,
        ),
    )


@attrs.frozen(kw_only=True, slots=False)
class LogOptions:
    """What the herd tells: logs and metrics."""

    log_level: str = attrs.field(
        default="info", metadata=option("choice", "log level", choices=LOG_LEVELS)
    )
    log_format: str = attrs.field(
        default="text",
        metadata=option(
            "choice",
            "log lines on stderr: text, or one JSON object per line",
            choices=LOG_FORMATS,
        ),
    )
    access_log: bool = attrs.field(
        default=False, metadata=option("bool", "log one line per request")
    )
    metrics_bind: str | None = attrs.field(
        default=None,
        metadata=option(
            "str", "HOST:PORT serving Prometheus metrics for the whole herd (off by default)"
        ),
    )
