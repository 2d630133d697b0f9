"""Developer and operator experience: --reload, trioherd.testing, logs (text and JSON),
asyncio-only apps with --asyncio, and the command line's polish."""

from __future__ import annotations

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

import trioherd
from helpers import ROOT, TESTS, CLIHerd, open_herd, unique_name, wait_until
from trioherd import _cli
from trioherd.primary import control as _control
from trioherd.primary import metrics as _metrics
from trioherd.primary import reload as _reload
from trioherd.testing import LeftoverError
from trioherd.testing import open_herd as open_test_herd

# -- --reload ----------------------------------------------------------------------------

RELOAD_APP = """
from trioherd import Response

async def app(request):
    return Response({body!r})
"""


def write_atomically(path: Path, text: str) -> None:
    """As an editor saves: a new file renamed over the old one."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def get_text(url: str) -> str:
    try:
        with httpx.Client(timeout=10) as client:
            return client.get(url).text
    except httpx.HTTPError as exc:
        return repr(exc)


def status_of(herd: CLIHerd) -> dict[str, Any]:
    return json.loads(herd.control("status", "--json").stdout)


def test_reload_serves_edits_and_keeps_the_last_good_code_through_a_broken_one(
    cli_herd: Any, tmp_path: Path
) -> None:
    app_file = tmp_path / "reload_app.py"
    write_atomically(app_file, RELOAD_APP.format(body="version one"))
    herd = cli_herd(
        "reload_app:app", "--workers", "2", "--reload", env={"PYTHONDONTWRITEBYTECODE": "1"}
    )
    url = herd.wait_ready()
    assert herd.stderr.startswith("trioherd: listening on ")
    assert get_text(url) == "version one"
    assert wait_until(lambda: "watching " in herd.stderr, 10), herd.stderr
    write_atomically(app_file, RELOAD_APP.format(body="version two, edited"))
    assert wait_until(lambda: get_text(url) == "version two, edited", 30), herd.stderr
    assert wait_until(lambda: status_of(herd)["reloads"] == 1, 30)

    write_atomically(app_file, "def app(request:\n")  # a syntax error
    assert wait_until(lambda: "the new code could not boot" in herd.stderr, 30), herd.stderr
    assert "SyntaxError" in herd.stderr
    assert get_text(url) == "version two, edited"  # the last good code serves on
    status = status_of(herd)
    assert (status["reloads"], status["reloads_failed"]) == (1, 1)
    assert all(worker["state"] == "ready" for worker in status["workers"])

    write_atomically(app_file, RELOAD_APP.format(body="version three, fixed"))
    assert wait_until(lambda: get_text(url) == "version three, fixed", 30), herd.stderr
    assert wait_until(lambda: status_of(herd)["reloads"] == 2, 30)
    (tmp_path / "notes.txt").write_text("not *.py: no reload")
    assert herd.stop() == 0
    assert status["reloads_failed"] == 1
    assert herd.stderr.count("changed: reloading") == 3


def test_reload_globs() -> None:
    roots = ["/src"]
    assert _reload.matches("/src/app.py", roots, ["*.py"], [])
    assert _reload.matches("/src/pkg/deep/mod.py", roots, ["*.py"], [])
    assert not _reload.matches("/src/notes.txt", roots, ["*.py"], [])
    assert _reload.matches("/src/templates/page.html", roots, ["templates/*.html"], [])
    assert not _reload.matches("/src/page.html", roots, ["templates/*.html"], [])
    assert not _reload.matches("/src/build/lib/app.py", roots, ["*.py"], ["build"])
    assert not _reload.matches("/src/test_app.py", roots, ["*.py"], ["test_*.py"])
    # directories above the watched one do not count
    assert _reload.matches("/home/build/src/app.py", ["/home/build/src"], ["*.py"], ["build"])


def run_trioherd(
    *args: str, hide: str = "", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m trioherd ARGS``, as if the module ``hide`` were not installed."""
    code = "import sys\n"
    if hide:
        code += f"sys.modules[{hide!r}] = None\n"
    code += "from trioherd._cli import main\nmain(sys.argv[1:])\n"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(ROOT)])},
    )


def test_reload_and_uvloop_without_their_extras_exit_2_naming_the_extra() -> None:
    name = unique_name()
    result = run_trioherd("serve", "--reload", "--name", name, hide="watchfiles")
    assert result.returncode == 2
    assert result.stderr == (
        "trioherd: error: --reload: needs the watchfiles package: pip install 'trioherd[reload]'\n"
    )
    result = run_trioherd("serve", "--asyncio", "--loop", "uvloop", "--name", name, hide="uvloop")
    assert result.returncode == 2
    assert result.stderr == (
        "trioherd: error: --loop: uvloop is not installed: pip install 'trioherd[asyncio]'\n"
    )
    result = run_trioherd(
        "serve", "--asyncio", "--loop", "trio-asyncio", "--name", name, hide="trio_asyncio"
    )
    assert result.returncode == 2
    assert result.stderr == (
        "trioherd: error: --loop: trio-asyncio is not installed: pip install trio-asyncio\n"
    )
    result = run_trioherd("serve", "--reload", "--reload-dir", "/no/such/dir", "--name", name)
    assert result.returncode == 2
    assert "--reload-dir: /no/such/dir: no such directory" in result.stderr


# -- trioherd.testing ---------------------------------------------------------------------


def test_docs_testing_md_shows_the_example_test_as_it_is() -> None:
    doc = (ROOT / "docs" / "testing.md").read_text()
    block = re.search(r"```python\n(.*?)```", doc, re.DOTALL)
    assert block is not None
    assert block.group(1) == (TESTS / "test_testing_example.py").read_text()


async def test_open_herd_has_its_own_control_directory_and_changes_no_environment() -> None:
    environ = dict(os.environ)
    async with open_test_herd("apps.http_apps:native", workers=1) as herd:
        directory = herd.config.control_dir
        assert directory is not None and directory != _control.control_dir()
        assert os.listdir(directory) == [f"{herd.config.name}.sock"]
        assert herd.url == herd.addresses[0]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", herd.url)
    assert not os.path.exists(directory)
    assert dict(os.environ) == environ


async def test_open_herd_raises_errors_as_they_are_and_names_leftovers() -> None:
    with pytest.raises(trioherd.WorkerBootError, match="database password missing"):
        async with open_test_herd("apps.broken:app", workers=1, max_boot_failures=1):
            pass  # pragma: no cover - never started
    with pytest.raises(ZeroDivisionError):
        async with open_test_herd("apps.http_apps:native", workers=1):
            1 / 0  # noqa: B018
    with pytest.raises(LeftoverError, match=r"control socket .*stray\.sock"):
        async with open_test_herd("apps.http_apps:native", workers=1) as herd:
            assert herd.config.control_dir is not None
            Path(herd.config.control_dir, "stray.sock").write_text("")


async def test_messages_sent_while_booting_wait_for_the_first_subscriber() -> None:
    async with open_herd(app="apps.devex_apps:announcing", workers=2) as herd:
        ids = {worker.id for worker in herd.workers}
        seen = set()
        with trio.fail_after(10):
            async for event in herd.messages():  # subscribed after every worker booted
                seen.add(event.data["booted"])
                if seen == ids:
                    break
        # lifecycle events are news, and the messages were taken by the first subscriber:
        # a later subscriber to all events sees only what happens from its call on
        kinds: list[str] = []
        with trio.move_on_after(0.5):
            async for event in herd.events():
                kinds.append(event.kind)
        assert kinds == []


# -- logs --------------------------------------------------------------------------------


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line, parsed (an AssertionError names a line that is not JSON)."""
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return records


def json_ready(herd: CLIHerd, timeout: float = 60) -> str:
    def ready() -> bool:
        return '"listening on ' in herd.stderr or herd.process.poll() is not None

    assert wait_until(ready, timeout), herd.stderr
    first = json_lines(herd.stderr)[0]
    assert first["message"].startswith("listening on http://127.0.0.1:"), first
    return str(first["url"])


def test_json_logs_every_line_is_an_object(cli_herd: Any) -> None:
    herd = cli_herd(
        "apps.devex_apps:printer", "--workers", "2", "--log-format", "json", "--access-log"
    )
    url = json_ready(herd)
    with httpx.Client() as client:
        assert client.get(url + "/a?b=1").text == "printed"
    herd.control("reload")
    assert wait_until(lambda: '"reload complete"' in herd.stderr, 30)
    assert wait_until(lambda: '"duration_ms"' in herd.stderr, 10)
    assert herd.stop() == 0
    records = json_lines(herd.stderr)
    for record in records:
        assert {"time", "level", "logger", "message", "pid"} <= record.keys(), record
        moment = datetime.datetime.fromisoformat(record["time"])
        assert moment.tzinfo is not None
    messages = [record["message"] for record in records]
    assert messages[0].startswith("listening on http://127.0.0.1:")
    access = next(r for r in records if r["logger"] == "trioherd.access")
    assert access["method"] == "GET" and access["path"] == "/a?b=1"
    assert access["status"] == 200 and access["bytes"] > 0
    assert access["client"].startswith("127.0.0.1:") and access["duration_ms"] >= 0
    assert isinstance(access["worker"], int)
    printed = [r for r in records if r["logger"] == "app"]
    assert [(r["stream"], r["message"]) for r in printed] == [
        ("stdout", "hello stdout /a"),
        ("stderr", "hello stderr"),
        ("stderr", "second line"),
    ]
    assert printed[0]["worker"] == access["worker"] and printed[0]["pid"] == access["pid"]
    ready = [r for r in records if re.fullmatch(r"worker \d+ \(pid \d+\) ready", r["message"])]
    assert len(ready) == 4 and all("worker_pid" in r for r in ready)  # 2 booted, 2 reloaded
    for text in ("reloading 2 workers", "stopping: disconnecting 2 workers", "stopped"):
        assert text in messages


def test_text_logs_lifecycle_lines_and_tagged_app_output(cli_herd: Any) -> None:
    herd = cli_herd("apps.devex_apps:printer", "--workers", "1")
    url = herd.wait_ready()
    with httpx.Client() as client:
        assert client.get(url + "/x").text == "printed"
    assert wait_until(lambda: "second line" in herd.stderr, 10)
    herd.control("reload")
    result = herd.control("scale", "1")
    assert result.stdout.strip().endswith("now has 1 worker")
    assert herd.stop() == 0
    lines = herd.stderr.splitlines()
    assert lines[0].startswith("trioherd: listening on http://127.0.0.1:")
    assert re.search(r"INFO worker 1 \(pid \d+\) ready$", lines[1])
    assert "[w1] hello stdout /x" in lines
    assert "[w1] hello stderr" in lines and "[w1] second line" in lines
    text = herd.stderr
    assert re.search(r"INFO reloading 1 worker$", text, re.MULTILINE)
    assert re.search(r"INFO worker 2 \(pid \d+\) ready$", text, re.MULTILINE)
    assert re.search(r"INFO worker 1 \(pid \d+\) exited after disconnect", text)
    assert re.search(r"INFO stopping: disconnecting 1 worker$", text, re.MULTILINE)
    assert lines[-1].endswith("INFO stopped")


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_a_boot_failure_prints_the_traceback_once(cli_herd: Any, log_format: str) -> None:
    herd = cli_herd("apps.broken:app", "--workers", "2", "--log-format", log_format)
    assert herd.process.wait(60) == 3
    assert herd.stderr.count("RuntimeError: this app cannot boot") == 1, herd.stderr
    assert herd.stderr.count("Traceback") == 1
    if log_format == "json":
        (last,) = [r for r in json_lines(herd.stderr) if "could not boot" in r["message"]]
        assert last["level"] == "critical"


def test_a_plain_def_app_is_refused_at_boot(cli_herd: Any) -> None:
    herd = cli_herd("apps.devex_apps:sync_app", "--workers", "2")
    assert herd.process.wait(60) == 3
    assert "apps.devex_apps:sync_app is a plain function (def), not async def" in herd.stderr
    assert herd.stderr.count("plain function") == 1


# -- asyncio apps without --asyncio (the asyncio runtime itself: tests/test_asyncio.py) ---


def test_an_asyncio_app_without_the_flag_gets_one_hint(cli_herd: Any) -> None:
    herd = cli_herd("apps.quart_app:app", "--workers", "1")
    url = herd.wait_ready()
    with httpx.Client() as client:
        for _ in range(3):
            assert client.get(url).status_code == 500
    assert wait_until(lambda: herd.stderr.count("app raised") == 3, 10), herd.stderr
    assert herd.stop() == 0
    hints = [line for line in herd.stderr.splitlines() if "--asyncio" in line]
    assert len(hints) == 1, hints
    assert "RuntimeError: no running event loop" in hints[0]


async def test_asyncio_at_lifespan_startup_boots_with_the_flag_and_hints_without() -> None:
    app = "apps.devex_apps:asyncio_at_startup"
    with pytest.raises(trioherd.WorkerBootError) as caught:
        async with open_test_herd(app, workers=1, max_boot_failures=1):
            pass  # pragma: no cover - never started
    assert "RuntimeError: no running event loop" in caught.value.text
    assert caught.value.text.rstrip().endswith(
        "the app needs an asyncio event loop: serve it with --asyncio"
    )
    async with open_test_herd(app, workers=1, asyncio=True) as herd:
        async with httpx.AsyncClient() as client:
            assert (await client.get(herd.url)).text == "ok"


def test_asyncio_serves_asgi_apps_only(cli_herd: Any) -> None:
    herd = cli_herd("apps.http_apps:native", "--asyncio", "--workers", "1")
    assert herd.process.wait(60) == 3
    assert "--asyncio: runs ASGI apps only (this app is a native app)" in herd.stderr


# -- the command line ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "trioherd: error: the following arguments are required: COMMAND"),
        (["serve", "--workers", "many"], "argument --workers: invalid int value: 'many'"),
        (["serve", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["serve", "--log-format", "xml"], "argument --log-format: invalid choice: 'xml'"),
        (["scale"], "trioherd scale: error: scale needs N, +N or -N"),
        (["scale", "lots"], "expected N, +N or -N (got 'lots')"),
        (["scale", "0"], "a herd needs at least one worker (asked for 0)"),
        (["scale", "2", "3"], "unrecognized arguments: 3"),
        (["reload", "now"], "trioherd: error: unrecognized arguments: now"),
        (["status", "--name", "a/b"], "argument --name: 'a/b' is not a valid herd name"),
        (["stop", "--timeout", "-1"], "argument --timeout: must be >= 0 (got -1)"),
        (["stop", "--timeout", "soon"], "argument --timeout: invalid float value: 'soon'"),
    ],
)
def test_usage_errors_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        _cli.run_cli(argv)
    assert info.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and message in error, error
    assert re.search(r"\(see trioherd( \w+)? --help\)$", error.strip())


def test_version_and_defaults_in_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _cli.run_cli(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"trioherd {trioherd.__version__} (trio ")
    assert re.search(r", httptools \d+\.\d+", out)  # which parser --http auto takes
    with pytest.raises(SystemExit):
        _cli.run_cli(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in (
        "(default: round-robin)",
        "cancelled (default: 30)",
        "(default: info)",
        "(default: text)",
        "replaces the default *.py)",
        "--reload, --no-reload",
    ):
        assert shown in text or shown.replace(", ", " | ") in text, shown


async def test_reloads_counts_successes_and_failures_apart(tmp_path: Path) -> None:
    app_file = tmp_path / "counted_app.py"
    app_file.write_text(RELOAD_APP.format(body="good"))
    async with open_herd(app=f"{app_file}:app", workers=1) as herd:
        app_file.write_text("raise ImportError('a broken release')\n")
        with pytest.raises(trioherd.ReloadError, match="a broken release"):
            await herd.reload()
        assert (herd.reloads, herd.reloads_failed) == (0, 1)
        app_file.write_text(RELOAD_APP.format(body="good again"))
        await herd.reload()
        assert (herd.reloads, herd.reloads_failed) == (1, 1)
        status = _control.status(herd)
        assert (status["reloads"], status["reloads_failed"]) == (1, 1)
        metrics = _metrics.render(herd)
        assert "trioherd_reloads_total 1\n" in metrics
        assert "trioherd_reloads_failed_total 1\n" in metrics
        table = _cli.format_status(status)
        assert "reloads 1 (1 failed)" in table.splitlines()[0]


def test_tls_example_without_trustme_says_what_to_install(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, runpy; sys.modules['trustme'] = None; "
            "sys.argv = ['tls_server.py', '--bind', '127.0.0.1:0']; "
            f"runpy.run_path({str(ROOT / 'examples' / 'tls_server.py')!r}, run_name='__main__')",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert "pip install trustme" in result.stderr and "--certfile" in result.stderr
