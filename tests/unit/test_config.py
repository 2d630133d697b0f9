"""Options: validation, precedence CLI > env > file > default, TOML."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioherd._config import Config, build_config, import_string_of, parse_host_port
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
