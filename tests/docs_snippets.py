"""The code blocks of README.md and docs/*.md, read as a reader copies them, for
tests/test_docs.py: where each is, what kind of thing it is, and the commands of a shell
block.

The one change a snippet gets before it runs (:func:`on_loopback`): a listening address
``HOST:PORT`` becomes ``127.0.0.1:0``, so that a test listens on loopback, on a free port,
and never collides with a herd already running on the machine's usual port.
"""

from __future__ import annotations

import ast
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from helpers import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FRAGMENT = "<!-- fragment"
"""An HTML comment on the line before a ```python block marks it as a fragment: only
compiled, never run (a value shown as Python, say). Rare on purpose."""

# the apps a reader's shell commands may serve that the tests provide: the README's app
# as myapp (and myapp.web, the name deploy.md and the TOML example use), or the demo app
PROVIDED_APPS = {None, "myapp:app", "myapp.web:app"}
# options of `serve` that take no value (the others take the next word)
FLAGS_WITHOUT_VALUE = {
    "--reload",
    "--asyncio",
    "--access-log",
    "--proxy-protocol",
    "--defer-accept",
    "--batch-primary",
    "--ws-per-message-deflate",
}
_LISTENING = re.compile(r"(?:0\.0\.0\.0|127\.0\.0\.1|localhost|\[::\]|\[::1\]):[1-9][0-9]*")


@dataclass(frozen=True)
class Snippet:
    """One fenced code block: its file, the line of its opening fence, its language."""

    doc: Path
    line: int
    lang: str
    text: str
    fragment: bool

    def __str__(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"

    @property
    def module_name(self) -> str:
        """A name to write the snippet under: ``snippet_operations_md_402``."""
        return re.sub(r"\W", "_", f"snippet_{self.doc.name}_{self.line}")


def read_snippets(docs: list[Path] = DOCS) -> list[Snippet]:
    found = []
    for doc in docs:
        lines = doc.read_text().splitlines()
        index = 0
        while index < len(lines):
            fence = re.match(r"^( *)```(\S*)\s*$", lines[index])
            if fence is None:
                index += 1
                continue
            end = index + 1
            while lines[end].strip() != "```":
                end += 1
            before = next((ln for ln in reversed(lines[:index]) if ln.strip()), "")
            indent = len(fence.group(1))
            text = "".join(line[indent:] + "\n" for line in lines[index + 1 : end])
            fragment = before.strip().startswith(FRAGMENT)
            found.append(Snippet(doc, index + 1, fence.group(2), text, fragment))
            index = end + 1
    return found


def python_kind(snippet: Snippet) -> str:
    """``fragment``; ``test`` (it defines test_* functions: a pytest module);
    ``program`` (it calls trio.run or trioherd.run: it serves until stopped); or
    ``module`` (it defines things, among them apps to serve)."""
    if snippet.fragment:
        return "fragment"
    tree = ast.parse(snippet.text, str(snippet))
    if defined_tests(snippet):
        return "test"
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            if ast.unparse(node.value.func) in ("trio.run", "trioherd.run"):
                return "program"
    return "module"


def defined_tests(snippet: Snippet) -> list[str]:
    """The ``test_*`` functions of a snippet, async or not."""
    tree = ast.parse(snippet.text, str(snippet))
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    return [n.name for n in tree.body if isinstance(n, kinds) and n.name.startswith("test_")]


def top_level_async_functions(snippet: Snippet) -> list[str]:
    tree = ast.parse(snippet.text, str(snippet))
    return [node.name for node in tree.body if isinstance(node, ast.AsyncFunctionDef)]


def on_loopback(text: str) -> str:
    """``text`` with every listening address ``HOST:PORT`` made ``127.0.0.1:0``."""
    return _LISTENING.sub("127.0.0.1:0", text)


@dataclass(frozen=True)
class Command:
    """One command of a shell block: environment assignments, then the words."""

    env: dict[str, str]
    words: list[str]
    text: str

    @property
    def trioherd(self) -> str | None:
        """The subcommand of ``python3 -m trioherd SUBCOMMAND ...``, or None."""
        words = self.words
        if (
            len(words) >= 4
            and words[0] in ("python3", "python")
            and words[1:3] == ["-m", "trioherd"]
        ):
            return words[3]
        return None

    @property
    def app(self) -> str | None:
        """The app a ``serve`` names (None: the demo app, or the one of ``--config``)."""
        words = self.words[4:]
        index = 0
        while index < len(words):
            word = words[index]
            if not word.startswith("-"):
                return word
            takes_value = word not in FLAGS_WITHOUT_VALUE and not word.startswith("--no-")
            index += 2 if takes_value and "=" not in word else 1
        return None


def shell_commands(snippet: Snippet) -> list[Command]:
    """The commands of a ```sh block, continuation lines joined, comments dropped."""
    commands = []
    for line in snippet.text.replace("\\\n", " ").splitlines():
        words = shlex.split(line, comments=True)
        if not words:
            continue
        env = {}
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
            name, _, value = words.pop(0).partition("=")
            env[name] = value
        commands.append(Command(env, words, line.strip()))
    return commands


def why_not_run(snippet: Snippet) -> str | None:
    """None if a shell block is run by the tests: every command is ``python3 -m trioherd``,
    a ``serve`` comes before any control command, and each ``serve`` serves an app the tests
    provide. Otherwise, why it is not."""
    text = snippet.text
    for needle, reason in (
        ("pip install", "installs packages"),
        ("bench/", "a benchmark (run by hand, never by the suite)"),
        ("pytest", "runs the test suite itself"),
        ("sudo ", "needs root"),
        ("openssl req", "makes certificates (test_tls_md_mutual_tls_example runs it)"),
        ("openssl s_client", "a TLS client (tests/test_tls_resumption.py checks resumption)"),
        ("examples/", "runs an example (tests/test_examples.py runs the examples)"),
    ):
        if needle in text:
            return reason
    serving = False
    for command in shell_commands(snippet):
        if command.trioherd is None:
            return f"not a trioherd command: {command.text}"
        if command.trioherd == "serve":
            if command.app not in PROVIDED_APPS:
                return f"serves an app of the reader's own ({command.app})"
            serving = True
        elif not serving:
            return "needs a herd running already"
    return None


def table_after(doc: Path, heading: str) -> list[list[str]]:
    """The rows (cells stripped, header and rule left out) of the first Markdown table
    after the line that starts with ``heading``."""
    lines = doc.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows: list[list[str]] = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
        elif rows:
            break
    return rows[2:]


def block_after(doc: Path, heading: str) -> str:
    """The text of the first code block after the line that starts with ``heading``."""
    text = doc.read_text()
    start = text.index("\n" + heading) + 1
    match = re.compile(r"^```\S*\n(.*?)^```", re.S | re.M).search(text, start)
    assert match is not None, f"no code block after {heading!r} in {doc.name}"
    return match.group(1)
