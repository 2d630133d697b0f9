"""docs/deploy.md states the defaults the code has: its table of the defaults that matter
behind a balancer, every "`--flag` … (default X)" in its prose, the default listener and
the kill margin."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from trioherd import _cli
from trioherd._config import DEFAULT_BIND, OPTIONS_BY_NAME, Option, convert
from trioherd.primary.process import KILL_MARGIN

DEPLOY = Path(__file__).resolve().parents[2] / "docs" / "deploy.md"
TEXT = DEPLOY.read_text()

# "`--flag`" or "`trioherd CMD --flag`" (a metavar may follow inside the backticks), then,
# before any other backticked text or the sentence's end, "default X"
STATED = re.compile(
    r"`(?:trioherd (?P<command>\w+) )?(?P<flag>--[a-z][a-z-]*)[^`]*`"
    r"[^`.]{0,80}?\bdefault:? (?P<value>`[^`]+`|\*\*[^*]+\*\*|[0-9][0-9,.]*(?: s\b)?|on\b|off\b)"
)


def option_of(flag: str) -> Option:
    return OPTIONS_BY_NAME[flag.removeprefix("--").replace("-", "_")]


def documented(option: Option, text: str) -> Any:
    """A default as the page writes it (``5 s``, ``10000``, ``off``, `` `x-forwarded` ``)
    in the option's type."""
    text = text.strip("`*").strip()
    if option.kind in ("int", "float"):
        text = text.removesuffix(" s").replace(",", "")
    if option.kind == "bool":
        text = {"on": "true", "off": "false"}.get(text, text)
    return convert(option, text)


def table_rows() -> list[list[str]]:
    """The rows of the first table after "## Behind nginx or HAProxy" (no header, no rule)."""
    lines = TEXT.split("\n## Behind nginx or HAProxy\n", 1)[1].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def test_the_table_of_defaults_behind_a_balancer_is_the_code_s() -> None:
    rows = table_rows()
    assert len(rows) >= 10
    wrong = {}
    for row in rows:
        option = option_of(row[0].strip("`"))
        if documented(option, row[1]) != option.default:
            wrong[option.flag] = (row[1], option.default)
    assert wrong == {}
    flags = {row[0].strip("`") for row in rows}
    assert {"--max-connections", "--drain-delay", "--forwarded-headers"} <= flags


def test_every_default_stated_in_the_prose_is_the_code_s() -> None:
    stop = _cli._parser().subcommands["stop"]  # `trioherd stop --timeout`
    found = list(STATED.finditer(TEXT))
    wrong = {}
    for match in found:
        flag, value = match["flag"], match["value"]
        if match["command"] == "stop":
            code: Any = stop.get_default(flag.removeprefix("--"))
            said: Any = float(value.removesuffix(" s"))
        elif flag == "--bind":  # its default is the listener opened when none is given
            code, said = DEFAULT_BIND, value.strip("`")
        else:
            option = option_of(flag)
            code, said = option.default, documented(option, value)
        if said != code:
            wrong[f"line {TEXT.count(chr(10), 0, match.start()) + 1}: {flag}"] = (value, code)
    assert wrong == {}
    flags = {match["flag"] for match in found}
    assert len(found) >= 7 and {"--max-connections", "--keep-alive-timeout"} <= flags, flags


def test_the_default_listener_and_the_kill_margin() -> None:
    assert re.findall(r"`--bind` defaults to `([^`]+)`", TEXT) == [DEFAULT_BIND]
    assert re.findall(r"`KILL_MARGIN = ([0-9.]+)`", TEXT) == [str(KILL_MARGIN)]
