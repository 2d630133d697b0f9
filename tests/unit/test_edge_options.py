"""The edge's options (issue 24): --forwarded-headers, --proxy-protocol-allow-ips and
--drain-delay, their defaults, and bad values, which exit 2 with a message that names the
option, from the command line, the environment or a TOML file."""

from __future__ import annotations

from pathlib import Path

import pytest

from trioherd import _cli
from trioherd._config import Config, build_config
from trioherd._errors import ConfigError


def test_the_defaults() -> None:
    config = Config()
    assert config.forwarded_headers == "x-forwarded"
    assert config.proxy_protocol_allow_ips == "127.0.0.1,::1"
    assert config.drain_delay == 0.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--drain-delay", "-1"], "trioherd: error: --drain-delay: must be >= 0 (got -1.0)"),
        (
            ["--proxy-protocol-allow-ips", "10.0.0.300"],
            "trioherd: error: --proxy-protocol-allow-ips: '10.0.0.300' does not appear to be",
        ),
        (
            ["--proxy-protocol", "--proxy-protocol-allow-ips", "10.0.0.0/40"],
            "trioherd: error: --proxy-protocol-allow-ips: ",
        ),
    ],
)
def test_a_bad_value_exits_2_naming_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _cli.run_cli(["serve", *argv]) == _cli.EXIT_USAGE == 2
    error = capsys.readouterr().err
    assert error.startswith(message), error
    assert error.count("\n") == 1


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--forwarded-headers", "x-real-ip"], "argument --forwarded-headers: invalid choice"),
        (["--drain-delay", "soon"], "argument --drain-delay: invalid float value: 'soon'"),
    ],
)
def test_a_value_argparse_refuses_exits_2_naming_the_option(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _cli.run_cli(["serve", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_values_from_the_environment_and_a_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^--forwarded-headers: must be one of x-forwarded, "):
        build_config({}, {"TRIOHERD_FORWARDED_HEADERS": "x-real-ip"}, None)
    with pytest.raises(ConfigError, match=r"^--drain-delay: must be a number"):
        build_config({}, {"TRIOHERD_DRAIN_DELAY": "soon"}, None)
    toml = tmp_path / "herd.toml"
    toml.write_text('proxy-protocol-allow-ips = "nonsense"\n')
    with pytest.raises(ConfigError, match=r"^--proxy-protocol-allow-ips: 'nonsense'"):
        build_config({}, {}, str(toml))
    toml.write_text('forwarded-headers = "forwarded"\ndrain-delay = 10\n')
    config = build_config({}, {}, str(toml))
    assert (config.forwarded_headers, config.drain_delay) == ("forwarded", 10.0)
