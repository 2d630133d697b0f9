"""Configuration: the Config class is the one table of options; the CLI, TOML and env vars
are derived from it.

Each user-facing option is a field of :class:`Config` whose metadata (:func:`_option`)
carries its kind, help text, choices and minimum. :data:`OPTIONS` is read from those
fields, so a default is written once, in the field. Fields without that metadata (``app``,
``ssl_context_factory``, ``control``, ``control_dir``, ``handle_signals``, ``listen_fds``)
are library-only.

Precedence is CLI > environment (``TRIOHERD_<OPTION>``) > TOML file (``--config``) > default.
Every value is validated here, once, so the primary and the workers can trust a Config.
A bad value raises :class:`ConfigError`, whose message names the option as a user typed it.
"""

from __future__ import annotations

import importlib.util
import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ._errors import ConfigError
from .protocols.forwarded import check_spec

DISPATCH_POLICIES = ("round-robin", "least-busy", "shared")
INTERFACES = ("auto", "native", "asgi", "stream")
CLIENT_CERT_MODES = ("none", "optional", "required")
TLS_VERSIONS = ("1.2", "1.3")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS = ("text", "json")
WS_MODES = ("auto", "wsproto", "none")
HTTP_PARSERS = ("auto", "h11", "httptools")
DEFAULT_BIND = "127.0.0.1:8000"
KINDS = ("int", "float", "str", "bool", "list", "intlist", "choice")
_OPTION_KEY = "trioherd.option"


def have_httptools() -> bool:
    return importlib.util.find_spec("httptools") is not None


def http_parser(config: Config) -> str:
    """The parser ``--http`` names: ``auto`` is httptools when it is installed."""
    if config.http == "auto":
        return "httptools" if have_httptools() else "h11"
    return config.http


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@attrs.frozen
class _OptionInfo:
    """What a Config field needs to be a user-facing option (kept in its metadata)."""

    kind: str  # one of KINDS
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None


def _option(
    kind: str, help: str, *, choices: tuple[str, ...] = (), minimum: float | None = None
) -> dict[str, _OptionInfo]:
    """Field metadata that makes a Config field a CLI flag, env var and TOML key."""
    assert kind in KINDS, kind
    assert (kind == "choice") == bool(choices), kind
    return {_OPTION_KEY: _OptionInfo(kind, help, choices, minimum)}


def _app_string(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else import_string_of(value)


def _tuple_of_str(value: Any) -> tuple[str, ...]:
    return tuple(value)


def _tuple_of_int(value: Any) -> tuple[int, ...]:
    return tuple(value)


@attrs.frozen(kw_only=True)
class Config:
    """Everything a herd needs. Build it with keyword arguments; values are validated.

    ``app`` is an import string (``package.module:attr``) or None for the built-in demo app.
    A callable is accepted too and turned into its import string.
    """

    app: str | None = attrs.field(default=None, converter=_app_string)
    bind: tuple[str, ...] = attrs.field(
        default=(),
        converter=_tuple_of_str,
        metadata=_option(
            "list",
            f"TCP address HOST:PORT to listen on (repeatable; default "
            f"{DEFAULT_BIND} when no other listener is given; port 0 picks a free port)",
        ),
    )
    uds: tuple[str, ...] = attrs.field(
        default=(),
        converter=_tuple_of_str,
        metadata=_option("list", "Unix socket path to listen on (repeatable)"),
    )
    fd: tuple[int, ...] = attrs.field(
        default=(),
        converter=_tuple_of_int,
        metadata=_option(
            "intlist",
            "inherited listening socket fd (repeatable; systemd "
            "LISTEN_FDS is picked up automatically)",
        ),
    )
    workers: int = attrs.field(
        factory=available_cpus,
        metadata=_option("int", "number of worker processes (default: CPUs available)", minimum=1),
    )
    dispatch: str = attrs.field(
        default="round-robin",
        metadata=_option("choice", "how connections reach workers", choices=DISPATCH_POLICIES),
    )
    interface: str = attrs.field(
        default="auto",
        metadata=_option("choice", "app interface (auto-detected by default)", choices=INTERFACES),
    )
    http: str = attrs.field(
        default="auto",
        metadata=_option(
            "choice",
            "request parser: httptools (llhttp) reads the heads of requests without a body, "
            "h11 the rest; h11 alone reads all; auto is httptools when installed "
            "(trioherd[httptools])",
            choices=HTTP_PARSERS,
        ),
    )
    name: str = attrs.field(
        default="default", metadata=_option("str", "herd name: names the control socket")
    )
    graceful_timeout: float = attrs.field(
        default=30.0,
        metadata=_option(
            "float",
            "seconds a disconnecting worker has to finish "
            "in-flight work before what is left is cancelled",
            minimum=0,
        ),
    )
    worker_timeout: float = attrs.field(
        default=30.0,
        metadata=_option(
            "float",
            "seconds without a heartbeat from a worker's event loop before it is killed "
            "and replaced",
            minimum=0.1,
        ),
    )
    boot_timeout: float = attrs.field(
        default=60.0,
        metadata=_option(
            "float",
            "seconds a new worker has to import the app and report ready",
            minimum=0.1,
        ),
    )
    max_boot_failures: int = attrs.field(
        default=3,
        metadata=_option(
            "int",
            "consecutive worker deaths before ready that make the herd give up (exit 3)",
            minimum=1,
        ),
    )
    min_uptime: float = attrs.field(
        default=10.0,
        metadata=_option(
            "float",
            "a worker that lived this long resets its slot's respawn back-off",
            minimum=0,
        ),
    )
    backoff_max: float = attrs.field(
        default=15.0,
        metadata=_option("float", "cap in seconds of the exponential respawn back-off", minimum=0),
    )
    keep_alive_timeout: float = attrs.field(
        default=5.0,
        metadata=_option("float", "seconds an idle keep-alive connection is kept", minimum=0),
    )
    header_timeout: float = attrs.field(
        default=10.0,
        metadata=_option(
            "float",
            "seconds to receive a whole request head once its "
            "first byte arrived (slowloris bound: 408, then close)",
            minimum=0.01,
        ),
    )
    send_timeout: float = attrs.field(
        default=30.0,
        metadata=_option(
            "float",
            "seconds a response may go without the client taking any of it before the "
            "connection is closed (reset)",
            minimum=0.01,
        ),
    )
    max_header_size: int = attrs.field(
        default=16384,
        metadata=_option("int", "bytes of request line + headers (431)", minimum=64),
    )
    max_header_count: int = attrs.field(
        default=100, metadata=_option("int", "number of request headers (431)", minimum=1)
    )
    max_body_size: int = attrs.field(
        default=16 * 1024 * 1024,
        metadata=_option("int", "bytes of request body (413)", minimum=0),
    )
    max_requests_per_connection: int = attrs.field(
        default=1000,
        metadata=_option(
            "int",
            "requests served on one keep-alive connection before it is closed (0 = no limit)",
            minimum=0,
        ),
    )
    max_requests: int = attrs.field(
        default=0,
        metadata=_option(
            "int", "requests a worker serves before it is replaced (0 = never)", minimum=0
        ),
    )
    max_requests_jitter: int = attrs.field(
        default=0,
        metadata=_option("int", "random 0..N added to max-requests per worker", minimum=0),
    )
    max_memory: int = attrs.field(
        default=0,
        metadata=_option(
            "int", "RSS in MiB past which a worker is replaced (0 = never)", minimum=0
        ),
    )
    max_connections: int = attrs.field(
        default=10000,
        metadata=_option(
            "int",
            "open connections per worker; near it, idle keep-alive connections are closed "
            "oldest first, and a full worker gets no new ones",
            minimum=1,
        ),
    )
    ws: str = attrs.field(
        default="auto",
        metadata=_option(
            "choice",
            "WebSocket support (wsproto): auto or wsproto serves it, none serves upgrade "
            "requests as plain HTTP",
            choices=WS_MODES,
        ),
    )
    ws_max_size: int = attrs.field(
        default=16 * 1024 * 1024,
        metadata=_option(
            "int", "bytes of one incoming WebSocket message (past it: close 1009)", minimum=1
        ),
    )
    ws_ping_interval: float = attrs.field(
        default=20.0,
        metadata=_option(
            "float", "seconds between WebSocket pings to each client (0 = no pings)", minimum=0
        ),
    )
    ws_ping_timeout: float = attrs.field(
        default=20.0,
        metadata=_option(
            "float",
            "seconds a WebSocket client has to answer a ping before it is dropped (0 = wait "
            "forever)",
            minimum=0,
        ),
    )
    ws_per_message_deflate: bool = attrs.field(
        default=True,
        metadata=_option(
            "bool", "accept WebSocket permessage-deflate compression a client offers (RFC 7692)"
        ),
    )
    certfile: str | None = attrs.field(
        default=None, metadata=_option("str", "TLS certificate chain (PEM); enables HTTPS")
    )
    keyfile: str | None = attrs.field(
        default=None, metadata=_option("str", "TLS private key (PEM)")
    )
    keyfile_password: str | None = attrs.field(
        default=None, metadata=_option("str", "password of the TLS private key")
    )
    ca_certs: str | None = attrs.field(
        default=None, metadata=_option("str", "CA bundle to verify client certificates with")
    )
    client_cert: str = attrs.field(
        default="none",
        metadata=_option("choice", "client certificate verification", choices=CLIENT_CERT_MODES),
    )
    tls_handshake_timeout: float = attrs.field(
        default=10.0, metadata=_option("float", "seconds for a TLS handshake", minimum=0.01)
    )
    tls_min_version: str = attrs.field(
        default="1.2",
        metadata=_option("choice", "lowest TLS version accepted", choices=TLS_VERSIONS),
    )
    ssl_context_factory: str | None = None
    metrics_bind: str | None = attrs.field(
        default=None,
        metadata=_option(
            "str", "HOST:PORT serving Prometheus metrics for the whole herd (off by default)"
        ),
    )
    log_level: str = attrs.field(
        default="info", metadata=_option("choice", "log level", choices=LOG_LEVELS)
    )
    access_log: bool = attrs.field(
        default=False, metadata=_option("bool", "log one line per request")
    )
    forwarded_allow_ips: str = attrs.field(
        default="127.0.0.1,::1",
        metadata=_option(
            "str",
            "peers whose X-Forwarded-For/-Proto and Forwarded headers set the client address "
            "and scheme: comma list of IPs and CIDRs, * for all (Unix sockets are trusted)",
        ),
    )
    defer_accept: bool = attrs.field(
        default=False,
        metadata=_option(
            "bool",
            "serving HTTP on TCP, the kernel hands over a connection once its first bytes "
            "came (Linux TCP_DEFER_ACCEPT; a client that sends nothing waits about 1 s). "
            "Off by default: under a flood past the accept queue Linux holds a deferred "
            "client's request back for seconds and the connection may time out unanswered",
        ),
    )
    batch_primary: bool = attrs.field(
        default=True,
        metadata=_option(
            "bool",
            "while the primary hands connections over, its wake-ups do not preempt a busy "
            "worker (Linux SCHED_BATCH for the primary alone): fewer context switches per "
            "new connection",
        ),
    )
    proxy_protocol: bool = attrs.field(
        default=False,
        metadata=_option(
            "bool",
            "every connection starts with a PROXY protocol header (v1 or v2, as HAProxy's "
            "send-proxy); the client address comes from it",
        ),
    )
    log_format: str = attrs.field(
        default="text",
        metadata=_option(
            "choice",
            "log lines on stderr: text, or one JSON object per line",
            choices=LOG_FORMATS,
        ),
    )
    reload: bool = attrs.field(
        default=False,
        metadata=_option(
            "bool",
            "watch the app's files and do a rolling reload when one changes (development; "
            "needs trioherd[reload])",
        ),
    )
    reload_dir: tuple[str, ...] = attrs.field(
        default=(),
        converter=_tuple_of_str,
        metadata=_option(
            "list", "directory to watch with --reload (repeatable; default: the current one)"
        ),
    )
    reload_include: tuple[str, ...] = attrs.field(
        default=("*.py",),
        converter=_tuple_of_str,
        metadata=_option(
            "list",
            "glob of the files whose change triggers a reload (repeatable; replaces the "
            "default *.py)",
        ),
    )
    reload_exclude: tuple[str, ...] = attrs.field(
        default=(),
        converter=_tuple_of_str,
        metadata=_option("list", "glob of files or directories --reload ignores (repeatable)"),
    )
    asyncio: bool = attrs.field(
        default=False,
        metadata=_option(
            "bool",
            "run an asyncio-only ASGI app (Django, Quart, asyncpg) in an asyncio loop "
            "hosted by Trio (needs trioherd[asyncio])",
        ),
    )
    control: bool = True
    control_dir: str | None = None
    """Directory of the control socket; None: ``$XDG_RUNTIME_DIR/trioherd``, else
    ``<tmp>/trioherd-<uid>`` (``primary.control.control_dir``)."""
    handle_signals: bool = False
    listen_fds: bool = True

    def __attrs_post_init__(self) -> None:
        for option in OPTIONS:
            _validate(option, getattr(self, option.name))
        for address in self.bind:
            parse_host_port(address, "bind")
        if self.metrics_bind is not None:
            parse_host_port(self.metrics_bind, "metrics_bind")
        if self.keyfile and not self.certfile:
            raise ConfigError("keyfile", "needs --certfile too")
        if self.client_cert != "none" and not self.ca_certs:
            raise ConfigError("client_cert", f"{self.client_cert!r} needs --ca-certs")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError("name", f"{self.name!r} is not a valid herd name")
        if self.http == "httptools" and not have_httptools():
            raise ConfigError(
                "http", "httptools is not installed: pip install trioherd[httptools]"
            )
        problem = check_spec(self.forwarded_allow_ips)
        if problem is not None:
            raise ConfigError("forwarded_allow_ips", problem)

    @property
    def tls(self) -> bool:
        return bool(self.certfile or self.ssl_context_factory)

    def to_wire(self) -> dict[str, Any]:
        """The plain-data form sent to workers."""
        return attrs.asdict(self)

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Config:
        fields = {f.name for f in attrs.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in fields})


@attrs.frozen
class Option:
    """One user-facing setting, read from a Config field: name, type, help, default."""

    name: str
    kind: str  # one of KINDS
    help: str
    choices: tuple[str, ...]
    minimum: float | None
    field: attrs.Attribute[Any] = attrs.field(repr=False, eq=False)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "TRIOHERD_" + self.name.upper()

    @property
    def default(self) -> Any:
        """The value ``Config()`` gives this option (a factory's result, e.g. workers)."""
        factory = getattr(self.field.default, "factory", None)
        return factory() if callable(factory) else self.field.default


def _options() -> tuple[Option, ...]:
    options = []
    for field in attrs.fields(Config):
        info = field.metadata.get(_OPTION_KEY)
        if isinstance(info, _OptionInfo):
            options.append(
                Option(field.name, info.kind, info.help, info.choices, info.minimum, field)
            )
    return tuple(options)


OPTIONS: tuple[Option, ...] = _options()
OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


def _validate(option: Option, value: Any) -> None:
    if value is None:
        return
    if option.kind == "choice" and value not in option.choices:
        raise ConfigError(
            option.name, f"must be one of {', '.join(option.choices)} (got {value!r})"
        )
    if option.kind in ("int", "float"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(option.name, f"must be a number (got {value!r})")
        if option.kind == "int" and not isinstance(value, int):
            raise ConfigError(option.name, f"must be a whole number (got {value!r})")
        if option.minimum is not None and value < option.minimum:
            raise ConfigError(option.name, f"must be >= {option.minimum:g} (got {value!r})")
    if option.kind == "bool" and not isinstance(value, bool):
        raise ConfigError(option.name, f"must be true or false (got {value!r})")


def parse_host_port(text: str, option: str = "bind") -> tuple[str, int]:
    """``"127.0.0.1:8000"`` -> ``("127.0.0.1", 8000)``; ``"[::1]:0"`` -> ``("::1", 0)``."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ConfigError(option, f"expected HOST:PORT (got {text!r})")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    port = int(port_text)
    if port > 65535:
        raise ConfigError(option, f"port out of range (got {text!r})")
    return host or "0.0.0.0", port


def convert(option: Option, raw: Any) -> Any:
    """Turn a string (env var, CLI) or a TOML value into the option's type."""
    if isinstance(raw, str):
        text = raw.strip()
        try:
            if option.kind == "int":
                return int(text)
            if option.kind == "float":
                return float(text)
        except ValueError:
            raise ConfigError(option.name, f"must be a number (got {raw!r})") from None
        if option.kind == "bool":
            lowered = text.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off", ""):
                return False
            raise ConfigError(option.name, f"must be true or false (got {raw!r})")
        if option.kind == "list":
            return tuple(part for part in text.replace(",", " ").split() if part)
        if option.kind == "intlist":
            try:
                return tuple(int(part) for part in text.replace(",", " ").split())
            except ValueError:
                raise ConfigError(option.name, f"must be whole numbers (got {raw!r})") from None
        return text
    if option.kind in ("list", "intlist"):
        items = raw if isinstance(raw, list) else [raw]
        wanted = int if option.kind == "intlist" else str
        if not all(isinstance(item, wanted) and not isinstance(item, bool) for item in items):
            raise ConfigError(option.name, f"must be a list of {wanted.__name__} (got {raw!r})")
        return tuple(items)
    if option.kind == "float" and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if option.kind in ("str", "choice") and not isinstance(raw, str):
        raise ConfigError(option.name, f"must be a string (got {raw!r})")
    return raw


def from_env(environ: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for option in OPTIONS:
        if option.env in environ:
            values[option.name] = convert(option, environ[option.env])
    if "TRIOHERD_APP" in environ:
        values["app"] = environ["TRIOHERD_APP"]
    return values


def from_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
    table = data.get("trioherd", data)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        name = key.replace("-", "_")
        if name == "app":
            if not isinstance(raw, str):
                raise ConfigError("app", f"must be a string (got {raw!r})")
            values["app"] = raw
            continue
        option = OPTIONS_BY_NAME.get(name)
        if option is None:
            raise ConfigError(key, f"unknown option in {path}")
        values[name] = convert(option, raw)
    return values


def build_config(
    cli: Mapping[str, Any],
    environ: Mapping[str, str],
    config_file: str | None,
    **fixed: Any,
) -> Config:
    """Merge the sources with precedence CLI > env > file > default."""
    merged: dict[str, Any] = {}
    if config_file:
        merged.update(from_toml(config_file))
    merged.update(from_env(environ))
    merged.update({k: v for k, v in cli.items() if v is not None})
    merged.update(fixed)
    return make_config(**merged)


def make_config(**values: Any) -> Config:
    """Config(**values), with a TypeError for an unknown keyword turned into a ConfigError."""
    known = {f.name for f in attrs.fields(Config)}
    for key in values:
        if key not in known:
            raise ConfigError(key, "unknown option")
    if values.get("workers") is None:
        values.pop("workers", None)
    return Config(**values)


def import_string_of(obj: Callable[..., Any] | Any) -> str:
    """The import string a worker can load ``obj`` by."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    if not module or not qualname or "<" in qualname:
        raise ConfigError("app", f"{obj!r} has no importable name; pass 'module:attr'")
    if module == "__main__":
        import sys

        main = sys.modules["__main__"]
        path = getattr(main, "__file__", None)
        if not path:
            raise ConfigError("app", "an app defined in an interactive __main__ cannot be loaded")
        spec = getattr(main, "__spec__", None)
        if spec is not None and spec.name:  # run with python -m: import by module name
            return f"{spec.name}:{qualname}"
        return f"{os.path.abspath(path)}:{qualname}"
    return f"{module}:{qualname}"
