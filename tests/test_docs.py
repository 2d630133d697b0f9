"""README.md and docs/ hold on a newcomer's machine: every snippet runs as written, and what
the docs say the code prints is what it prints.

How each fenced block is run (tests/docs_snippets.py reads them; the one change a snippet
gets is that a listening address ``HOST:PORT`` becomes ``127.0.0.1:0``):

- ```python blocks, by what they hold:
  - a **module** (it defines things): executed, and every top-level ``async def`` in it
    served by a real herd of one worker and asked once: an HTTP app must answer below 500,
    a stream handler must echo;
  - a **program** (it calls ``trio.run`` or ``trioherd.run``): run as a script until it
    prints its URL, asked once, then sent SIGINT, after which it must exit 0;
  - a **test** module (``test_*`` functions): run by pytest in a subprocess, in a
    directory without this repository's pytest configuration (so no ``trio_mode``);
  - a **fragment** (``<!-- fragment ... -->`` on the line before): only compiled. At most
    ``MAX_FRAGMENTS``, listed by ``test_inventory_every_snippet_is_run_or_says_why_not``.
- ```sh and ```bash blocks made of ``python3 -m trioherd`` commands: run line by line, a
  ``serve`` in the background (asked once when ready) until the block's ``stop`` or its
  end (then SIGTERM), every other command must exit 0; each gets a ``--name`` of its own.
  The rest (installs, benchmarks, the suite itself, examples) say why they are not run:
  ``pytest tests/test_docs.py -rP -k inventory`` prints the list.
- docs/tls.md's worked mutual-TLS example: its openssl commands, its server, and the
  exit status or output of each command of its curl transcript.

Programs, tests and shell blocks run in a reader's directory where ``myapp`` is the
README's app (``myapp.web`` too) and where the TOML files the docs name exist.
"""

from __future__ import annotations

import json
import logging
import os
import re
import runpy
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from docs_snippets import (
    DOCS,
    FRAGMENT,
    Snippet,
    block_after,
    defined_tests,
    on_loopback,
    python_kind,
    read_snippets,
    shell_commands,
    table_after,
    top_level_async_functions,
    why_not_run,
)
from helpers import ROOT, CLIHerd, connect, open_herd, receive_until, unique_name, wait_until
from trioherd._cli import format_status
from trioherd.apps.loading import detect_interface
from trioherd.worker import aio

README = ROOT / "README.md"
OPERATIONS = ROOT / "docs" / "operations.md"
TLS = ROOT / "docs" / "tls.md"
MAX_FRAGMENTS = 2
SNIPPETS = read_snippets()
PYTHON = [snippet for snippet in SNIPPETS if snippet.lang == "python"]
SHELL = [snippet for snippet in SNIPPETS if snippet.lang in ("sh", "bash")]
RUN_SHELL = [snippet for snippet in SHELL if why_not_run(snippet) is None]


def of_kind(kind: str) -> list[Snippet]:
    return [snippet for snippet in PYTHON if python_kind(snippet) == kind]


@pytest.fixture
def reader(tmp_path: Path) -> Path:
    """A directory as a reader has it: ``myapp`` is the README's first app snippet (the
    README says so), ``myapp.web`` the same app, and each TOML block whose first line names
    its file (``# trioherd.toml — ...``) is that file."""
    package = tmp_path / "myapp"
    package.mkdir()
    readme_app = next(snippet for snippet in PYTHON if snippet.doc == README)
    (package / "__init__.py").write_text(readme_app.text)
    (package / "web.py").write_text("from myapp import app  # noqa: F401\n")
    for snippet in SNIPPETS:
        named = re.match(r"#\s*(\S+\.toml)\b", snippet.text) if snippet.lang == "toml" else None
        if named is not None:
            (tmp_path / named.group(1)).write_text(on_loopback(snippet.text))
    return tmp_path


def assert_answers(url: str) -> None:
    reply = httpx.get(url + "/", timeout=30)
    assert reply.status_code < 500, (url, reply.status_code, reply.text)


async def assert_echoes(stream: trio.SocketStream) -> None:
    async with stream:
        with trio.fail_after(30):
            await stream.send_all(b"ping\n")
            assert await receive_until(stream, b"ping\n") == b"ping\n"


# -- the snippets ------------------------------------------------------------------------


@pytest.mark.parametrize("snippet", of_kind("module"), ids=str)
async def test_module_snippet_runs_and_its_apps_serve(snippet: Snippet, tmp_path: Path) -> None:
    path = tmp_path / f"{snippet.module_name}.py"
    path.write_text(on_loopback(snippet.text))
    namespace = runpy.run_path(str(path))
    for name in top_level_async_functions(snippet):
        interface = detect_interface(namespace[name])
        async with open_herd(app=f"{path}:{name}", workers=1) as herd:
            if interface == "stream":
                await assert_echoes(await connect(herd))
            else:
                await trio.to_thread.run_sync(assert_answers, herd.url)


@pytest.mark.parametrize("snippet", of_kind("program"), ids=str)
def test_program_snippet_serves_until_interrupted(snippet: Snippet, reader: Path) -> None:
    script = reader / f"{snippet.module_name}.py"
    script.write_text(on_loopback(snippet.text))
    program = CLIHerd([], reader, command=[sys.executable, str(script)])
    found: list[str] = []

    def printed_url() -> bool:
        output = program.out_path.read_text() + program.stderr
        found[:] = re.findall(r"https?://127\.0\.0\.1:[1-9][0-9]*", output)
        return bool(found) or program.process.poll() is not None

    try:
        assert wait_until(printed_url, 60) and found, program.stderr
        assert_answers(found[0])
        program.process.send_signal(signal.SIGINT)
        assert program.process.wait(60) == 0, program.stderr
    finally:
        program.stop()  # SIGTERM if still running: a graceful stop leaves nothing behind


def test_test_snippets_pass_under_pytest(reader: Path) -> None:
    expected = 0
    for snippet in of_kind("test"):
        (reader / f"test_{snippet.module_name}.py").write_text(on_loopback(snippet.text))
        expected += len(defined_tests(snippet))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(reader)]
    result = subprocess.run(command, cwd=reader, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{expected} passed" in result.stdout, result.stdout


@pytest.mark.parametrize("snippet", RUN_SHELL, ids=str)
def test_shell_snippet_runs(snippet: Snippet, reader: Path) -> None:
    name = unique_name()
    running: list[CLIHerd] = []
    try:
        for command in shell_commands(snippet):
            argv = [sys.executable, *(on_loopback(word) for word in command.words[1:])]
            argv += [] if "--name" in argv else ["--name", name]
            if command.trioherd == "serve":
                running.append(CLIHerd([], reader, command.env, command=argv))
                assert_answers(running[-1].wait_ready())
                continue
            env = {**os.environ, **command.env}
            control = subprocess.Popen(
                argv, cwd=reader, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
            if command.trioherd == "stop":  # reaped here: `stop` waits for the pid to go
                stopped = running.pop()
                assert stopped.process.wait(60) == 0, stopped.stderr
                stopped.close()
            _, error = control.communicate(timeout=300)
            assert control.returncode == 0, f"{command.text}: {error.decode()}"
        while running:
            herd = running.pop()
            assert herd.stop() == 0, herd.stderr
    finally:
        for herd in running:
            herd.stop()


def test_inventory_every_snippet_is_run_or_says_why_not() -> None:
    """The inventory (printed: ``-rP``): fragments are few, marked before a ```python
    block, and compile; each kind is found; each shell block not run says why."""
    kinds = {kind: len(of_kind(kind)) for kind in ("module", "program", "test", "fragment")}
    not_run = {str(snippet): why_not_run(snippet) for snippet in SHELL}
    not_run = {where: why for where, why in not_run.items() if why is not None}
    print(f"python snippets: {kinds}; shell snippets run: {[str(s) for s in RUN_SHELL]}")
    print("fragments:", [str(snippet) for snippet in of_kind("fragment")])
    print("shell snippets not run:", json.dumps(not_run, indent=1))
    assert all(kinds.values()), kinds
    assert kinds["fragment"] <= MAX_FRAGMENTS, of_kind("fragment")
    for snippet in of_kind("fragment"):
        compile(snippet.text, str(snippet), "exec")
    markers = sum(doc.read_text().count(FRAGMENT) for doc in DOCS)
    assert markers == kinds["fragment"], "a fragment marker not before a ```python block"
    assert RUN_SHELL and all(why for why in not_run.values())


def test_readme_opens_with_the_two_commands_ci_runs() -> None:
    """.ci/run takes the body of the README's second ```sh block as the CI test command:
    both first blocks stay one line, install, and serve or test."""
    first, second = [snippet.text for snippet in SNIPPETS if snippet.doc == README][:2]
    assert first == "python3 -m pip install . && python3 -m trioherd serve\n"
    assert second == "python3 -m pip install '.[test]' && python3 -m pytest\n"


def test_tls_md_mutual_tls_example(tmp_path: Path) -> None:
    """The openssl commands of docs/tls.md, its server and its app, and the curl
    transcript: the allowed client's answer, and each refusal's curl exit status."""
    block = next(snippet for snippet in SHELL if snippet.doc == TLS and "openssl" in snippet.text)
    certificates, serve_line = block.text.split("python3 -m trioherd serve", 1)
    app = next(s for s in PYTHON if s.doc == TLS and "ALLOWED" in s.text)
    (tmp_path / "myapp.py").write_text(app.text)
    made = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", certificates],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert made.returncode == 0, made.stderr
    (serve,) = shell_commands(
        Snippet(TLS, block.line, "sh", "python3 -m trioherd serve" + serve_line, False)
    )
    argv = [sys.executable, *(on_loopback(word) for word in serve.words[1:])]
    server = CLIHerd([], tmp_path, command=[*argv, "--name", unique_name()])
    try:
        port = server.wait_ready().rsplit(":", 1)[1]
        transcript = block_after(TLS, "From the client side:")
        for command, output in re.findall(r"^\$ (.*)\n((?:[^$].*\n)*)", transcript, re.M):
            run = subprocess.run(
                ["bash", "-c", command.replace("127.0.0.1:8443", f"127.0.0.1:{port}")],
                cwd=tmp_path,
                capture_output=True,
                text=True,
                timeout=60,
            )
            refused = re.match(r"curl: \((\d+)\)", output)
            if refused is None:
                assert (run.returncode, run.stdout) == (0, output), run.stderr
            else:
                assert run.returncode == int(refused.group(1)), (command, run.stderr)
        assert server.stop() == 0, server.stderr
    finally:
        server.close()


# -- what the docs say the code prints ---------------------------------------------------

SAMPLE_STATUS: dict[str, Any] = {
    "name": "default",
    "pid": 4242,
    "dispatch": "round-robin",
    "listeners": ["http://127.0.0.1:8000"],
    "size": 3,
    "reloads": 2,
    "reloads_failed": 1,
    "generation": 3,
    "preload": True,
    "molds": [{"generation": 3, "pid": 4244}],
    "workers": [
        {"id": 5, "slot": 0, "pid": 4250, "state": "ready", "generation": 3, "uptime": 187.4}
        | {"restarts": 1, "connections": 2, "websockets": 0, "requests": 918}
        | {"rss": round(31.2 * 2**20)},
        {"id": 2, "slot": 1, "pid": 4246, "state": "ready", "generation": 3, "uptime": 340.9}
        | {"restarts": 0, "connections": 3, "websockets": 1, "requests": 1022}
        | {"rss": round(30.8 * 2**20)},
    ],
    "backoff": [{"slot": 2, "restarts": 4}],
}


def columns(line: str) -> list[str]:
    return re.split(r"\s{2,}", line.strip())


def documented_keys(heading: str) -> set[str]:
    return {row[0].strip("`") for row in table_after(OPERATIONS, heading)}


def test_operations_md_status_sample_is_what_status_prints() -> None:
    assert format_status(SAMPLE_STATUS) + "\n" == block_after(OPERATIONS, "`status` prints:")


def test_status_and_its_json_keys_of_a_real_herd_are_operations_md(
    cli_herd: Any, tmp_path: Path
) -> None:
    """A real herd, with a slot made to wait in back-off (its worker killed while the app
    cannot boot): the table's columns and rows, and every key of ``status --json``."""
    sample = block_after(OPERATIONS, "`status` prints:").splitlines()
    flag = tmp_path / "fail-boot"
    options = ["--workers", "2", "--max-boot-failures", "1000", "--backoff-max", "1"]
    herd = cli_herd("apps.docs_apps:app", *options, env={"DOCS_APP_FAIL": str(flag)})
    try:
        check_status_of(herd, flag, sample)
    finally:
        flag.unlink(missing_ok=True)
        assert herd.stop() == 0, herd.stderr


def check_status_of(herd: CLIHerd, flag: Path, sample: list[str]) -> None:
    herd.wait_ready()
    table = herd.control("status").stdout.splitlines()
    assert columns(table[1]) == columns(sample[1])
    status = json.loads(herd.control("status", "--json").stdout)
    assert set(status) == documented_keys("`status --json` prints")
    for worker in status["workers"]:
        assert set(worker) == documented_keys("Each object of `workers`")
    flag.write_text("")
    os.kill(status["workers"][0]["pid"], signal.SIGKILL)
    seen: dict[str, Any] = {}

    def in_backoff() -> bool:
        seen["json"] = json.loads(herd.control("status", "--json").stdout)
        seen["table"] = herd.control("status").stdout.splitlines()
        return bool(seen["json"]["backoff"]) and any(" backoff " in r for r in seen["table"])

    assert wait_until(in_backoff, 60), seen
    for entry in seen["json"]["backoff"]:
        assert set(entry) == documented_keys("Each object of `backoff`")
    row = next(columns(r) for r in seen["table"] if " backoff " in r)
    shape = [cell if cell in ("-", "backoff") else "N" for cell in row]
    assert shape == [cell if cell in ("-", "backoff") else "N" for cell in columns(sample[-1])]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def hint_for(exc: BaseException) -> list[str]:
    """What a worker logs (besides the record itself) for a logged traceback of ``exc``."""
    record = logging.LogRecord("app", logging.ERROR, __file__, 1, "app raised", None, None)
    record.exc_info = (type(exc), exc, None)
    handler = _Lines()
    logger = logging.getLogger("trioherd.worker")
    logger.addHandler(handler)
    try:
        aio.AsyncioHint().filter(record)
    finally:
        logger.removeHandler(handler)
    return handler.lines


def test_operations_md_asyncio_hint_is_the_line_a_worker_logs() -> None:
    shown = block_after(OPERATIONS, "### An asyncio app without").strip()
    assert hint_for(RuntimeError("no running event loop")) == [shown.split(" ERROR ", 1)[1]]


def test_the_asyncio_hint_gives_a_whole_first_sentence_never_a_cut_word() -> None:
    trio_says = (
        "trio.run received unrecognized yield message <Future pending cb=[Task.task_wakeup()]>."
        " Are you trying to use a library written for some other framework like asyncio?"
        " That won't work without some kind of compatibility shim."
    )
    (line,) = hint_for(TypeError(trio_says))
    assert line == (
        "the app needs an asyncio event loop (TypeError: trio.run received unrecognized yield"
        " message <Future pending cb=[Task.task_wakeup()]>): serve it with --asyncio"
    )
    long = "no running event loop in " + " ".join(f"word{i}" for i in range(60))
    (line,) = hint_for(RuntimeError(long))
    reason = line.split("(RuntimeError: ", 1)[1].split("): serve it", 1)[0]
    assert reason.endswith(" …") and len(reason) <= 202
    assert long.startswith(reason.removesuffix(" …") + " ")


# -- the options table and the links ----------------------------------------------------

# how `serve --help` says a default, in the order tried; a value with no default is "—"
HELP_DEFAULTS = (
    r"\(default: ([^)]*)\)",
    r"; default:? (\S+?)(?: when [^;)]*)?[;)]",
    r"; default: ([^)]*)\)",
    r"replaces the default ([^\s;)]+)",
    r"\((\S+)-detected by default\)",
    r"\b([Oo]n|[Oo]ff) by default",
)
SAME_DEFAULT = {".": "the current one"}
# Options being added under issue 24 (the edge work) whose README rows come with them;
# a flag leaves this set when its row is in the table (the test below insists).
ROWS_TO_COME: set[str] = set()


def cli_defaults() -> dict[str, str]:
    """Every option of ``trioherd serve --help`` and the default it states."""
    env = {**os.environ, "COLUMNS": "1000"}
    command = [sys.executable, "-m", "trioherd", "serve", "--help"]
    text = subprocess.run(command, capture_output=True, text=True, env=env, check=True).stdout
    found = {}
    for entry in re.split(r"\n(?=  -)", text.split("\noptions:\n", 1)[1]):
        invocation, _, help_text = entry.strip().partition("  ")
        flags = [f for f in re.findall(r"--[a-z][a-z-]*", invocation) if f[:5] != "--no-"]
        if flags == ["--help"]:
            continue
        help_text = " ".join(help_text.split())
        matches = (re.search(pattern, help_text) for pattern in HELP_DEFAULTS)
        default = next((m.group(1) for m in matches if m is not None), "—")
        found[flags[0]] = default.lower() if default in ("On", "Off") else default
    return found


def readme_defaults() -> dict[str, str]:
    """The README's options table: each flag and the default it states."""
    found = {}
    for row in table_after(README, "## Options"):
        flags = [f for f in re.findall(r"--[a-z][a-z-]*", row[0]) if f[:5] != "--no-"]
        defaults = re.split(r"\s*/\s*|,\s+", row[1])
        defaults = defaults * len(flags) if len(defaults) == 1 else defaults
        assert len(defaults) == len(flags), row
        for flag, default in zip(flags, defaults, strict=True):
            default = default.strip("`")
            mib = re.fullmatch(r"(\d+) MiB", default)
            found[flag] = str(int(mib.group(1)) << 20) if mib else default
    return found


def test_readme_options_table_has_every_serve_option_with_its_default() -> None:
    documented, cli = readme_defaults(), cli_defaults()
    assert not ROWS_TO_COME & set(documented), "documented now: take it out of ROWS_TO_COME"
    assert sorted(documented) == sorted(set(cli) - ROWS_TO_COME)
    wrong = {
        flag: (documented[flag], default)
        for flag, default in cli.items()
        if flag not in ROWS_TO_COME
        and SAME_DEFAULT.get(documented[flag], documented[flag]) != default
    }
    assert wrong == {}


def test_operations_md_lists_every_serve_option() -> None:
    """docs/operations.md's "All options" (``--config`` has a section of its own)."""
    listed = set()
    for row in table_after(OPERATIONS, "### All options"):
        listed |= {f for f in re.findall(r"--[a-z][a-z-]*", row[0]) if f[:5] != "--no-"}
    assert sorted(listed) == sorted(set(cli_defaults()) - ROWS_TO_COME - {"--config"})


def heading_anchors(doc: Path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings (code blocks left out)."""
    anchors: set[str] = set()
    text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        suffix = 0
        while (slug if suffix == 0 else f"{slug}-{suffix}") in anchors:
            suffix += 1
        anchors.add(slug if suffix == 0 else f"{slug}-{suffix}")
    return anchors


def test_links_in_the_docs_reach_a_file_and_a_heading() -> None:
    broken = []
    for doc in DOCS:
        text = re.sub(r"^```.*?^```", "", doc.read_text(), flags=re.S | re.M)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (doc.parent / path).resolve() if path else doc
            if not linked.exists():
                broken.append(f"{doc.name}: {target} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in heading_anchors(linked):
                broken.append(f"{doc.name}: {target} (no such heading)")
    assert broken == []
