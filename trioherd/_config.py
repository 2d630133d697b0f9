"""Configuration: one table of options drives the Config class, the CLI, TOML and env vars.

Precedence is CLI > environment (``TRIOHERD_<OPTION>``) > TOML file (``--config``) > default.
Every value is validated here, once, so the primary and the workers can trust a Config.
A bad value raises :class:`ConfigError`, whose message names the option as a user typed it.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from ._errors import ConfigError

DISPATCH_POLICIES = ("round-robin", "least-busy", "shared")
INTERFACES = ("auto", "native", "asgi", "stream")
CLIENT_CERT_MODES = ("none", "optional", "required")
TLS_VERSIONS = ("1.2", "1.3")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DEFAULT_BIND = "127.0.0.1:8000"


def available_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@attrs.frozen
class Option:
    """One user-facing setting: its Config field, type, default and help text."""

    name: str
    kind: str  # int, float, str, bool, list, intlist, choice
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    cli_only: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option(
        "bind",
        "list",
        (),
        f"TCP address HOST:PORT to listen on (repeatable; default "
        f"{DEFAULT_BIND} when no other listener is given; port 0 picks a free port)",
    ),
    Option("uds", "list", (), "Unix socket path to listen on (repeatable)"),
    Option(
        "fd",
        "intlist",
        (),
        "inherited listening socket fd (repeatable; systemd "
        "LISTEN_FDS is picked up automatically)",
    ),
    Option(
        "workers", "int", None, "number of worker processes (default: CPUs available)", minimum=1
    ),
    Option(
        "dispatch",
        "choice",
        "round-robin",
        "how connections reach workers",
        choices=DISPATCH_POLICIES,
    ),
    Option(
        "interface",
        "choice",
        "auto",
        "app interface (auto-detected by default)",
        choices=INTERFACES,
    ),
    Option("name", "str", "default", "herd name: names the control socket"),
    Option(
        "graceful_timeout",
        "float",
        30.0,
        "seconds a disconnecting worker has to finish "
        "in-flight work before what is left is cancelled",
        minimum=0,
    ),
    Option(
        "worker_timeout",
        "float",
        30.0,
        "seconds without a heartbeat from a worker's event loop before it is killed and replaced",
        minimum=0.1,
    ),
    Option(
        "boot_timeout",
        "float",
        60.0,
        "seconds a new worker has to import the app and report ready",
        minimum=0.1,
    ),
    Option(
        "max_boot_failures",
        "int",
        3,
        "consecutive worker deaths before ready that make the herd give up (exit 3)",
        minimum=1,
    ),
    Option(
        "min_uptime",
        "float",
        10.0,
        "a worker that lived this long resets its slot's respawn back-off",
        minimum=0,
    ),
    Option(
        "backoff_max",
        "float",
        15.0,
        "cap in seconds of the exponential respawn back-off",
        minimum=0,
    ),
    Option(
        "keep_alive_timeout",
        "float",
        5.0,
        "seconds an idle keep-alive connection is kept",
        minimum=0,
    ),
    Option(
        "header_timeout",
        "float",
        10.0,
        "seconds to receive a whole request head once its "
        "first byte arrived (slowloris bound: 408, then close)",
        minimum=0.01,
    ),
    Option("max_header_size", "int", 16384, "bytes of request line + headers (431)", minimum=64),
    Option("max_header_count", "int", 100, "number of request headers (431)", minimum=1),
    Option("max_body_size", "int", 16 * 1024 * 1024, "bytes of request body (413)", minimum=0),
    Option(
        "max_requests_per_connection",
        "int",
        1000,
        "requests served on one keep-alive connection before it is closed (0 = no limit)",
        minimum=0,
    ),
    Option(
        "max_requests",
        "int",
        0,
        "requests a worker serves before it is replaced (0 = never)",
        minimum=0,
    ),
    Option(
        "max_requests_jitter", "int", 0, "random 0..N added to max-requests per worker", minimum=0
    ),
    Option(
        "max_memory", "int", 0, "RSS in MiB past which a worker is replaced (0 = never)", minimum=0
    ),
    Option(
        "max_connections",
        "int",
        1000,
        "open connections per worker; a full worker gets no new ones",
        minimum=1,
    ),
    Option("certfile", "str", None, "TLS certificate chain (PEM); enables HTTPS"),
    Option("keyfile", "str", None, "TLS private key (PEM)"),
    Option("keyfile_password", "str", None, "password of the TLS private key"),
    Option("ca_certs", "str", None, "CA bundle to verify client certificates with"),
    Option(
        "client_cert",
        "choice",
        "none",
        "client certificate verification",
        choices=CLIENT_CERT_MODES,
    ),
    Option("tls_handshake_timeout", "float", 10.0, "seconds for a TLS handshake", minimum=0.01),
    Option(
        "tls_min_version", "choice", "1.2", "lowest TLS version accepted", choices=TLS_VERSIONS
    ),
    Option(
        "metrics_bind",
        "str",
        None,
        "HOST:PORT serving Prometheus metrics for the whole herd (off by default)",
    ),
    Option("log_level", "choice", "info", "log level", choices=LOG_LEVELS),
    Option("access_log", "bool", False, "log one line per request"),
)

OPTIONS_BY_NAME = {option.name: option for option in OPTIONS}


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
    bind: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    uds: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    fd: tuple[int, ...] = attrs.field(default=(), converter=_tuple_of_int)
    workers: int = attrs.field(factory=available_cpus)
    dispatch: str = "round-robin"
    interface: str = "auto"
    name: str = "default"
    graceful_timeout: float = 30.0
    worker_timeout: float = 30.0
    boot_timeout: float = 60.0
    max_boot_failures: int = 3
    min_uptime: float = 10.0
    backoff_max: float = 15.0
    keep_alive_timeout: float = 5.0
    header_timeout: float = 10.0
    max_header_size: int = 16384
    max_header_count: int = 100
    max_body_size: int = 16 * 1024 * 1024
    max_requests_per_connection: int = 1000
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_memory: int = 0
    max_connections: int = 1000
    certfile: str | None = None
    keyfile: str | None = None
    keyfile_password: str | None = None
    ca_certs: str | None = None
    client_cert: str = "none"
    tls_handshake_timeout: float = 10.0
    tls_min_version: str = "1.2"
    ssl_context_factory: str | None = None
    metrics_bind: str | None = None
    log_level: str = "info"
    access_log: bool = False
    control: bool = True
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
        key = "TRIOHERD_" + option.name.upper()
        if key in environ:
            values[option.name] = convert(option, environ[key])
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
