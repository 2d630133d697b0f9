"""``python -m trioherd serve|status|reload|scale|stop``.

Exit codes: 0 after a graceful stop (or a control command that succeeded), 1 when a control
command failed or the herd was stopped at once by a second signal, 2 for a usage or
configuration error (the message names the option), 3 when the app cannot boot (the
message is the worker's own error).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

import trio

from ._config import OPTIONS, Config, Option, build_config, make_config
from ._errors import ConfigError, StoppedBeforeReady, WorkerBootError
from ._log import announce, plural, setup_logging
from ._serve import serve
from .primary import control as _control
from .primary.herd import Herd

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_BOOT = 3

log = logging.getLogger("trioherd.primary")
_SCALE = re.compile(r"[+-]?[0-9]+")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and a hint, not the whole usage."""

    subcommands: dict[str, _Parser]

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _version() -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        h11_version = version("h11")
    except PackageNotFoundError:  # pragma: no cover - h11 without its metadata
        h11_version = "?"
    try:  # what --http auto takes when it is there
        httptools = f"httptools {version('httptools')}"
    except PackageNotFoundError:
        httptools = "no httptools"
    return (
        f"trioherd {__version__} (trio {trio.__version__}, h11 {h11_version}, {httptools}, "
        f"Python {platform.python_version()})"
    )


def _help(option: Option) -> str:
    """The option's help, with its default unless the help already says it."""
    text = option.help
    default = option.default
    if "default" not in text:
        if option.kind == "bool":
            text += f" (default: {'on' if default else 'off'})"
        elif isinstance(default, tuple) and default:
            text += f" (default: {' '.join(default)})"
        elif isinstance(default, float):
            text += f" (default: {default:g})"
        elif default is not None and not isinstance(default, tuple):
            text += f" (default: {default})"
    return text.replace("%", "%%")


def _parser() -> _Parser:
    parser = _Parser(prog="trioherd", description="A Trio process herd serving HTTP/1.1")
    parser.add_argument("--version", action="version", version=_version())
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.subcommands = commands.choices
    serve_parser = commands.add_parser("serve", help="run a herd in the foreground")
    serve_parser.add_argument(
        "app", nargs="?", help="module:attr of the app (default: a built-in demo app)"
    )
    serve_parser.add_argument("--config", help="TOML file with options")
    for option in OPTIONS:
        kwargs: dict[str, Any] = {"dest": option.name, "default": None, "help": _help(option)}
        if option.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif option.kind == "list":
            kwargs["action"] = "append"
            kwargs["metavar"] = option.name.upper()
        elif option.kind == "intlist":
            kwargs["action"] = "append"
            kwargs["type"] = int
            kwargs["metavar"] = "N"
        elif option.kind == "choice":
            kwargs["choices"] = option.choices
        elif option.kind in ("int", "float"):
            kwargs["type"] = int if option.kind == "int" else float
            kwargs["metavar"] = "N" if option.kind == "int" else "SECONDS"
        serve_parser.add_argument(option.flag, **kwargs)
    for name, text in (
        ("status", "show the workers of a running herd"),
        ("reload", "replace every worker, one at a time, without dropping a request"),
        ("stop", "stop a herd gracefully"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--name", default="default", help="herd name (default: default)")
        if name == "status":
            sub.add_argument("--json", action="store_true", help="print one JSON object")
        if name == "stop":
            sub.add_argument(
                "--timeout",
                type=float,
                default=120.0,
                help="seconds to wait for the herd to exit (default: 120)",
            )
    scale = commands.add_parser("scale", help="set the number of workers: N, +N or -N")
    scale.add_argument("count", nargs="?", help="N, +N or -N")
    scale.add_argument("--name", default="default", help="herd name (default: default)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run_cli(list(sys.argv[1:] if argv is None else argv)))


def run_cli(argv: list[str]) -> int:
    parser = _parser()
    # "scale -1" must not read -1 as an option: take it out before argparse sees it
    negative = None
    if argv and argv[0] == "scale":
        for index, token in enumerate(argv[1:], 1):
            if token[:1] == "-" and token[1:].isdigit():
                negative = token
                argv = argv[:index] + argv[index + 1 :]
                break
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve_command(args)
    _check_control_args(parser, args, negative)
    return _control_command(args)


def _check_control_args(parser: _Parser, args: argparse.Namespace, negative: str | None) -> None:
    """Usage errors of status, reload, scale and stop (exit 2), found before the herd is
    asked anything."""
    sub = parser.subcommands[args.command]
    name = args.name
    if not name or "/" in name or name.startswith("."):
        sub.error(f"argument --name: {name!r} is not a valid herd name")
    if args.command == "scale":
        args.count = negative or args.count
        if args.count is None:
            sub.error("scale needs N, +N or -N")
        if not _SCALE.fullmatch(args.count):
            sub.error(f"expected N, +N or -N (got {args.count!r})")
        if args.count[:1] not in "+-" and int(args.count) < 1:
            sub.error(f"a herd needs at least one worker (asked for {args.count})")
    if args.command == "stop" and not args.timeout >= 0:
        sub.error(f"argument --timeout: must be >= 0 (got {args.timeout:g})")


def _serve_command(args: argparse.Namespace) -> int:
    cli = {option.name: getattr(args, option.name) for option in OPTIONS}
    if args.app is not None:
        cli["app"] = args.app
    try:
        config = build_config(cli, os.environ, args.config, handle_signals=True)
    except ConfigError as exc:
        announce(f"error: {exc}", "text", "error", option=exc.option)
        return EXIT_USAGE
    return run_config(config)


def run_config(config: Config) -> int:
    """Run a herd in the foreground until it stops; the process exit code."""
    fmt = config.log_format
    setup_logging(config.log_level, "primary", fmt)
    try:
        herd = trio.run(_serve_and_announce, config)
    except ConfigError as exc:
        announce(f"error: {exc}", fmt, "error", option=exc.option)
        return EXIT_USAGE
    except WorkerBootError as exc:  # the one place its text is printed
        announce(f"the app could not boot:\n{exc.text.rstrip()}", fmt, "critical")
        return EXIT_BOOT
    except StoppedBeforeReady as stopped:
        return EXIT_FAILED if stopped.forced else EXIT_OK
    except KeyboardInterrupt:
        return EXIT_FAILED
    return EXIT_FAILED if herd is not None and herd.forced else EXIT_OK


async def _serve_and_announce(config: Config) -> Herd | None:
    herd: Herd | None = None
    try:
        async with trio.open_nursery() as nursery:
            herd = await nursery.start(serve, config)
            for url in herd.addresses:
                announce(f"listening on {url}", config.log_format, url=url)
            for worker in herd.workers:  # their ready lines are held back during the boot
                log.info(
                    "worker %d (pid %d) ready",
                    worker.id,
                    worker.pid,
                    extra={"worker": worker.id, "worker_pid": worker.pid},
                )
    except BaseExceptionGroup as group:
        raise _single(group) from None
    return herd


def _single(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The one exception inside nested groups, or the group itself if there are more."""
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, BaseExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 else group


def run(app: Any = None, **options: Any) -> None:
    """Blocking form: ``trioherd.run("myapp:app", workers=4, bind=["0.0.0.0:8000"])``.

    Handles SIGINT/SIGTERM (graceful stop), SIGHUP (reload), SIGTTIN/SIGTTOU (scale).
    Raises ConfigError or WorkerBootError instead of exiting.
    """
    options.setdefault("handle_signals", True)
    config = make_config(app=app, **options)
    setup_logging(config.log_level, "primary", config.log_format)

    async def main() -> None:
        await _serve_and_announce(config)

    trio.run(main)


def _control_command(args: argparse.Namespace) -> int:
    message: dict[str, Any] = {"cmd": args.command}
    if args.command == "scale":
        message["n"] = args.count
    timeout = 3600.0 if args.command in ("reload", "scale") else 10.0
    try:
        reply = _control.request(args.name, message, timeout)
    except (ConnectionError, OSError) as exc:
        print(f"trioherd: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if not reply.get("ok"):
        print(f"trioherd: {reply.get('error', 'failed')}", file=sys.stderr)
        return EXIT_USAGE if reply.get("usage") else EXIT_FAILED
    if args.command == "status":
        status = reply["status"]
        print(json.dumps(status) if args.json else format_status(status))
    elif args.command == "stop":
        if not _wait_gone(int(reply["pid"]), args.timeout):
            print(
                f"trioherd: herd {args.name!r} still running after {args.timeout}s",
                file=sys.stderr,
            )
            return EXIT_FAILED
        print(f"trioherd: herd {args.name!r} stopped")
    elif args.command == "reload":
        print(f"trioherd: herd {args.name!r} reloaded")
    elif args.command == "scale":
        print(f"trioherd: herd {args.name!r} now has {plural(reply['size'], 'worker')}")
    return EXIT_OK


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def _generation(status: dict[str, Any]) -> str:
    """The header's generation of the code, and its molds (--preload)."""
    if "generation" not in status:
        return ""
    generation = status["generation"]
    molds = status.get("molds", [])
    own = [mold["pid"] for mold in molds if mold["generation"] == generation]
    more = f", {len(molds) - len(own)} retiring" if len(molds) > len(own) else ""
    return f"  generation {generation}" + (f" (mold pid {own[0]}{more})" if own else "")


def format_status(status: dict[str, Any]) -> str:
    """The status table a person reads at a glance (like ``pm2 ls``)."""
    lines = [
        f"herd {status['name']!r}  pid {status['pid']}  {status['dispatch']}  "
        f"{' '.join(status['listeners'])}  reloads {status.get('reloads', 0)}"
        + (f" ({status['reloads_failed']} failed)" if status.get("reloads_failed") else "")
        + _generation(status)
    ]
    header = (
        "id",
        "slot",
        "pid",
        "state",
        "gen",
        "uptime",
        "restarts",
        "conns",
        "ws",
        "requests",
        "rss MiB",
    )
    rows = [header]
    for worker in status["workers"]:
        rows.append(
            (
                str(worker["id"]),
                str(worker.get("slot", "")),
                str(worker["pid"]),
                worker["state"],
                str(worker.get("generation", "")),
                _duration(worker["uptime"]),
                str(worker["restarts"]),
                str(worker["connections"]),
                str(worker.get("websockets", 0)),
                str(worker["requests"]),
                f"{worker['rss'] / 1048576:.1f}",
            )
        )
    for slot in status.get("backoff", []):
        dashes = ("-", "-", "-", "-")
        restarts = str(slot["restarts"])
        rows.append(("-", str(slot["slot"]), "-", "backoff", "-", "-", restarts, *dashes))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        lines.append(
            "  ".join(
                cell.rjust(width) if i not in (3,) else cell.ljust(width)
                for i, (cell, width) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(lines)
