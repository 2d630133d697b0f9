"""Configuration: :class:`Config` is made of the option groups of ``_options`` (one field per
option, its default written once, there); the CLI, TOML and env vars are derived from it.

:data:`OPTIONS` is read from the fields whose metadata (``_options.option``) makes them a
user-facing option. Fields without that metadata (``app``, ``ssl_context_factory``,
``control``, ``control_dir``, ``handle_signals``, ``listen_fds``) are library-only.

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
from ._options import DEFAULT_BIND as DEFAULT_BIND
from ._options import KINDS as KINDS
from ._options import (
    OPTION_KEY,
    AppOptions,
    EdgeOptions,
    HTTPOptions,
    ListenOptions,
    LogOptions,
    OptionInfo,
    ProcessOptions,
    TLSOptions,
    WebSocketOptions,
)
from .protocols.forwarded import check_spec


def have_httptools() -> bool:
    return importlib.util.find_spec("httptools") is not None


def http_parser(config: Config) -> str:
    """The parser ``--http`` names: ``auto`` is httptools when it is installed."""
    if config.http == "auto":
        return "httptools" if have_httptools() else "h11"
    return config.http


def _app_string(value: Any) -> str | None:
    return value if value is None or isinstance(value, str) else import_string_of(value)


# attrs puts the fields of a base before those of the bases left of it: read from right to
# left, the groups are in the order of ``trioherd serve --help``
@attrs.frozen(kw_only=True)
class Config(
    LogOptions,
    EdgeOptions,
    TLSOptions,
    WebSocketOptions,
    HTTPOptions,
    AppOptions,
    ProcessOptions,
    ListenOptions,
):
    """Everything a herd needs. Build it with keyword arguments; values are validated.

    ``app`` is an import string (``package.module:attr``) or None for the built-in demo app.
    A callable is accepted too and turned into its import string. The options are the
    fields of the groups in ``_options`` (listeners, processes, the app, HTTP, WebSocket,
    TLS, the edge, logs).
    """

    app: str | None = attrs.field(default=None, converter=_app_string)
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
        if self.root_path and not self.root_path.startswith("/"):
            raise ConfigError("root_path", f"must start with / (got {self.root_path!r})")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ConfigError("name", f"{self.name!r} is not a valid herd name")
        if self.http == "httptools" and not have_httptools():
            raise ConfigError(
                "http", "httptools is not installed: pip install trioherd[httptools]"
            )
        for name in ("forwarded_allow_ips", "proxy_protocol_allow_ips"):
            problem = check_spec(getattr(self, name))
            if problem is not None:
                raise ConfigError(name, problem)

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
        info = field.metadata.get(OPTION_KEY)
        if isinstance(info, OptionInfo):
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
