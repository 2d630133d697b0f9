"""Options: validation, precedence CLI > env > file > default, TOML, and one table of
defaults that the CLI, the environment, TOML and Config all agree on."""

from __future__ import annotations

import os
from pathlib import Path

import attrs
import pytest

from trioherd import _cli
from trioherd._config import (
    KINDS,
    OPTIONS,
    Config,
    Option,
    build_config,
    import_string_of,
    parse_host_port,
)
from trioherd._errors import ConfigError


def test_defaults() -> None:
    config = Config()
    assert config.dispatch == "round-robin"
    assert config.workers >= 1
    assert config.graceful_timeout == 30.0
    assert not config.tls


def test_precedence_cli_over_env_over_file_over_default(tmp_path: Path) -> None:
    toml = tmp_path / "herd.toml"
    toml.write_text(
        'workers = 3\nkeep-alive-timeout = 7\nname = "from-file"\nbind = ["127.0.0.1:1"]\n'
    )
    env = {"TRIOHERD_WORKERS": "5", "TRIOHERD_NAME": "from-env"}
    config = build_config({"workers": 9}, env, str(toml))
    assert config.workers == 9  # CLI
    assert config.name == "from-env"  # env over file
    assert config.keep_alive_timeout == 7.0  # file over default
    assert config.bind == ("127.0.0.1:1",)
    assert config.header_timeout == 10.0  # default


def test_toml_in_a_trioherd_table(tmp_path: Path) -> None:
    toml = tmp_path / "pyproject-like.toml"
    toml.write_text(
        '[trioherd]\napp = "pkg.mod:app"\ndispatch = "least-busy"\naccess-log = true\n'
    )
    config = build_config({}, {}, str(toml))
    assert config.app == "pkg.mod:app" and config.dispatch == "least-busy" and config.access_log


@pytest.mark.parametrize(
    ("values", "option"),
    [
        ({"workers": 0}, "--workers"),
        ({"workers": 1.5}, "--workers"),
        ({"dispatch": "random"}, "--dispatch"),
        ({"graceful_timeout": -1}, "--graceful-timeout"),
        ({"bind": ("localhost",)}, "--bind"),
        ({"bind": ("127.0.0.1:70000",)}, "--bind"),
        ({"keyfile": "k.pem"}, "--keyfile"),
        ({"client_cert": "required", "certfile": "c.pem"}, "--client-cert"),
        ({"name": "a/b"}, "--name"),
        ({"metrics_bind": "nope"}, "--metrics-bind"),
    ],
)
def test_bad_values_name_the_option(values: dict[str, object], option: str) -> None:
    with pytest.raises(ConfigError) as info:
        build_config(values, {}, None)
    assert str(info.value).startswith(option)


def test_bad_env_and_file_values(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--max-body-size"):
        build_config({}, {"TRIOHERD_MAX_BODY_SIZE": "lots"}, None)
    with pytest.raises(ConfigError, match="--access-log"):
        build_config({}, {"TRIOHERD_ACCESS_LOG": "maybe"}, None)
    toml = tmp_path / "bad.toml"
    toml.write_text("no-such-option = 1\n")
    with pytest.raises(ConfigError, match="no-such-option"):
        build_config({}, {}, str(toml))
    toml.write_text("workers = [\n")
    with pytest.raises(ConfigError, match="--config"):
        build_config({}, {}, str(toml))
    with pytest.raises(ConfigError, match="--config"):
        build_config({}, {}, str(tmp_path / "missing.toml"))


def test_host_port_parsing() -> None:
    assert parse_host_port("127.0.0.1:0") == ("127.0.0.1", 0)
    assert parse_host_port("[::1]:8000") == ("::1", 8000)
    assert parse_host_port(":80") == ("0.0.0.0", 80)


async def sample_app(request: object) -> None: ...


def test_import_string_of_a_callable() -> None:
    assert import_string_of(sample_app) == f"{__name__}:sample_app"
    assert Config(app=sample_app).app == f"{__name__}:sample_app"
    with pytest.raises(ConfigError, match="--app"):
        import_string_of(lambda request: None)


def test_wire_round_trip() -> None:
    config = Config(workers=3, bind=["127.0.0.1:0"], access_log=True)
    assert Config.from_wire(config.to_wire()) == config


# -- one table: CLI, environment, TOML and Config agree on every option ----------------

# a value of each kind that is not the default: (as typed on the command line, in TOML)
SAMPLES: dict[str, tuple[list[str], object]] = {
    "int": (["7"], 7),
    "float": (["2.5"], 2.5),
    "str": (["somewhere"], "somewhere"),
    "bool": ([], True),  # --access-log, TRIOHERD_ACCESS_LOG=true, access-log = true
    "list": (["a", "b"], ["a", "b"]),
    "intlist": (["5", "6"], [5, 6]),
}
# values an option needs to be valid, and options it needs set too (given as Config fixed)
SPECIAL: dict[str, tuple[list[str], object]] = {
    "bind": (["127.0.0.1:1", "[::1]:2"], ["127.0.0.1:1", "[::1]:2"]),
    "metrics_bind": (["127.0.0.1:9100"], "127.0.0.1:9100"),
    "forwarded_allow_ips": (["10.0.0.0/8,::1"], "10.0.0.0/8,::1"),
    "proxy_protocol_allow_ips": (["10.0.0.0/8,::1"], "10.0.0.0/8,::1"),
    "max_header_size": (["1024"], 1024),
    "root_path": (["/api"], "/api"),  # a path: it starts with /
    "ws_per_message_deflate": (["false"], False),  # on by default: --no-ws-per-message-deflate
    "batch_primary": (["false"], False),  # on by default: --no-batch-primary
}
NEEDS = {"keyfile": {"certfile": "c.pem"}, "client_cert": {"ca_certs": "ca.pem"}}


def sample(option: Option) -> tuple[list[str], object]:
    """Text(s) for the CLI and env, and the TOML value, of a non-default value."""
    if option.name in SPECIAL:
        return SPECIAL[option.name]
    if option.kind == "choice":
        choice = option.choices[-1]
        return [choice], choice
    return SAMPLES[option.kind]


def cli_config(monkeypatch: pytest.MonkeyPatch, *argv: str) -> Config:
    """The Config ``trioherd serve ARGV`` would run, through the real parser."""
    seen: list[Config] = []
    monkeypatch.setattr(_cli, "run_config", lambda config: seen.append(config) or 0)
    assert _cli.run_cli(["serve", *argv]) == 0
    (config,) = seen
    return config


def option_values(config: Config) -> dict[str, object]:
    return {option.name: getattr(config, option.name) for option in OPTIONS}


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith("TRIOHERD_") and key != "TRIOHERD_TEST_MARKER":
            monkeypatch.delenv(key)


def test_options_are_the_fields_with_option_metadata() -> None:
    fields = [field.name for field in attrs.fields(Config)]
    names = [option.name for option in OPTIONS]
    assert names == [name for name in fields if name in names]  # in the order of Config
    assert len(names) == len(set(names))
    assert set(fields) - set(names) == {
        "app",
        "ssl_context_factory",
        "control",
        "control_dir",
        "handle_signals",
        "listen_fds",
    }
    assert all(option.help for option in OPTIONS)
    assert {option.kind for option in OPTIONS} <= set(KINDS)


@pytest.mark.usefixtures("clean_env")
def test_every_default_is_the_same_through_every_route(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    table = tmp_path / "table.toml"
    table.write_text("[trioherd]\n")
    defaults = option_values(Config())
    assert defaults == {option.name: option.default for option in OPTIONS}
    assert option_values(cli_config(monkeypatch)) == defaults
    assert option_values(build_config({}, {}, None)) == defaults
    assert option_values(build_config({}, {}, str(empty))) == defaults
    assert option_values(build_config({}, {}, str(table))) == defaults
    assert cli_config(monkeypatch, "--config", str(empty)) == cli_config(monkeypatch)
    assert Config.from_wire(Config().to_wire()) == Config()


@pytest.mark.usefixtures("clean_env")
@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_a_value_is_the_same_through_every_route(
    option: Option, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    texts, toml_value = sample(option)
    needs = NEEDS.get(option.name, {})
    direct = getattr(Config(**{option.name: toml_value}, **needs), option.name)
    assert direct != option.default

    flags = [f"{option.flag}={text}" for text in texts] or [option.flag]
    if option.kind == "bool" and option.default:  # an option on by default is turned off
        flags = ["--no-" + option.flag.removeprefix("--")]
    need_flags = [f"--{name.replace('_', '-')}={value}" for name, value in needs.items()]
    from_cli = getattr(cli_config(monkeypatch, *flags, *need_flags), option.name)

    env = {option.env: ",".join(texts) or "true"}
    env.update({f"TRIOHERD_{name.upper()}": value for name, value in needs.items()})
    from_env = getattr(build_config({}, env, None), option.name)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    from_cli_env = getattr(cli_config(monkeypatch), option.name)
    for key in env:
        monkeypatch.delenv(key)

    toml = tmp_path / "herd.toml"
    lines = [f"{option.name.replace('_', '-')} = {toml_literal(toml_value)}"]
    lines += [f'{name} = "{value}"' for name, value in needs.items()]
    toml.write_text("\n".join(lines) + "\n")
    from_toml = getattr(build_config({}, {}, str(toml)), option.name)
    from_cli_toml = getattr(cli_config(monkeypatch, "--config", str(toml)), option.name)

    assert from_cli == from_env == from_cli_env == from_toml == from_cli_toml == direct


def toml_literal(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_literal(item) for item in value) + "]"
    return repr(value)


@pytest.mark.usefixtures("clean_env")
def test_cli_beats_env_beats_file_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    toml = tmp_path / "herd.toml"
    toml.write_text("max-requests = 1\nmax-memory = 1\nmax-connections = 1\n")
    monkeypatch.setenv("TRIOHERD_MAX_REQUESTS", "2")
    monkeypatch.setenv("TRIOHERD_MAX_MEMORY", "2")
    config = cli_config(monkeypatch, "--config", str(toml), "--max-requests", "3")
    assert (config.max_requests, config.max_memory, config.max_connections) == (3, 2, 1)
    assert config.handle_signals  # what `trioherd serve` adds


def test_a_bad_cli_value_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRIOHERD_WORKERS", "0")
    assert _cli.run_cli(["serve"]) == _cli.EXIT_USAGE
    assert capsys.readouterr().err.startswith("trioherd: error: --workers")
    with pytest.raises(SystemExit) as info:
        _cli.run_cli(["serve", "--workers", "many"])
    assert info.value.code == 2


def test_http_auto_is_httptools_only_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    from trioherd import _config

    assert _config.http_parser(Config(http="h11")) == "h11"
    assert _config.http_parser(Config(http="auto")) == "httptools"  # a test extra
    monkeypatch.setattr(_config, "have_httptools", lambda: False)
    assert _config.http_parser(Config(http="auto")) == "h11"
    with pytest.raises(ConfigError) as info:
        Config(http="httptools")
    assert info.value.option == "http" and "pip install trioherd[httptools]" in str(info.value)
