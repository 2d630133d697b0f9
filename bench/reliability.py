#!/usr/bin/env python3
"""Reliability under chaos: trioherd against gunicorn (uvicorn workers), uvicorn --workers
and Node's cluster module, all serving the 13-byte "Hello, World!" on 127.0.0.1 with 2
workers, measured by the same client in one session. docs/reliability.md explains the
experiments and how to read the tables.

    python3 bench/reliability.py                       # everything, 10 s per experiment
    DURATION=3 SERVERS="trioherd node" python3 bench/reliability.py    # a quick smoke run
    DURATION=20 EXPERIMENTS="sigkill slowloris" python3 bench/reliability.py

Experiments (each on a freshly started server, under load for DURATION seconds):

- sigkill:   SIGKILL a random worker about once a second;
- sigterm:   SIGTERM a random worker five times, evenly spread;
- reload:    SIGHUP the server's top process three times (a rolling restart where the
             server has one; "n/a" where it has none);
- slowloris: CROWD sockets held open beside the load (half trickle a request head one
             byte per 0.5 s, half send nothing; reconnected when the server cuts them);
- blocked:   one worker's event loop blocked (``GET /block``: a ``time.sleep`` in the app)
             for the whole load: what the load's new connections pay for it;
- abuse:     no load: ABUSE connections (20000) from 64 threads, in turn garbage then
             FIN, a GET then FIN, half a head then a half-close, half a head then RST,
             each read to the server's close; a GET every 0.2 s meanwhile must be
             answered; the servers' fds and RSS 2 s after, against before;
- burst:     no load: for each N of BURST (default 1500 3000 10000), N connections opened
             at once, each sending a GET and reading its answer, and the time until the
             last is answered; then FIRE connections (3000) that send a GET and close
             at once, one after another, and how long a GET right after waits.

Only workers at least one second old are killed or SIGTERMed (a worker that is still
booting is not serving yet, and a trioherd worker that dies before it is ready counts
toward its boot-failure limit). The load is CLIENTS threads, each sending
``GET / HTTP/1.1`` with ``Connection: close`` on a new connection and reading to EOF;
a request fails if it errs, times out (REQUEST_TIMEOUT), or is not a 200 with the
13-byte body. After the load, the server gets up to 15 s to have 2 workers again and
answer (column "recovered").

Environment: DURATION (s per experiment, 1..600, default 10), CLIENTS (1..64, 4),
CROWD (0..20000, 1000), REQUEST_TIMEOUT (s, 10), BURST (sizes, default "1500 3000
10000"), FIRE (0..20000, 3000), ABUSE (0..100000, 20000), SERVERS (subset of
"trioherd trioherd-shared gunicorn uvicorn node"), EXPERIMENTS (subset of
"sigkill sigterm reload slowloris blocked burst abuse"), BENCH_VENV (venv to create or
reuse, default /tmp/trioherd-bench-venv, as bench/run.sh), BENCH_REINSTALL=1 (pip install again),
BENCH_LOGDIR (server logs; default a new /tmp/trioherd-reliability.XXXXXX), RESULTS
(where the markdown report is written too, default BENCH_LOGDIR/reliability.md), SEED
(random seed for the choice of victims; default: a fresh one, printed in the report).

Bounded everywhere: a server must answer within 30 s of its start, gets 15 s between
SIGTERM and SIGKILL, every request has a timeout, every thread is joined. All traffic
goes to 127.0.0.1. The script itself needs only the standard library; the servers run
from the venv (trioherd from this repository, as in bench/run.sh).
"""

from __future__ import annotations

import os
import random
import resource
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
HELLO = b"Hello, World!"
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
WORKERS = 2
START_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0
RECOVER_TIMEOUT = 15.0
MIN_WORKER_AGE = 1.0  # seconds: younger workers are not killed or SIGTERMed
ALL_SERVERS = ("trioherd", "trioherd-shared", "gunicorn", "uvicorn", "node")
ALL_EXPERIMENTS = ("sigkill", "sigterm", "reload", "slowloris", "blocked", "burst", "abuse")
LABELS = {
    "trioherd": "trioherd",
    "trioherd-shared": "trioherd --dispatch shared",
    "gunicorn": "gunicorn -k uvicorn.workers.UvicornWorker",
    "uvicorn": "uvicorn --workers",
    "node": "node cluster (bench/node_cluster.js)",
}
TITLES = {
    "sigkill": "SIGKILL a random worker about once a second",
    "sigterm": "SIGTERM a random worker five times",
    "reload": "three rolling reloads (SIGHUP to the top process)",
    "slowloris": "a slowloris crowd beside the load",
    "blocked": "one worker's loop blocked (time.sleep in the app) beside the load",
    "burst": "connections opened all at once, no other load",
    "abuse": "abusive connections (garbage, FIN or RST mid-head, half-close), no other load",
}


def log(message: str) -> None:
    print(f"[reliability {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def env_number(name: str, default: float, low: float, high: float) -> float:
    text = os.environ.get(name, "")
    try:
        value = float(text) if text else default
    except ValueError:
        sys.exit(f"{name} must be a number, got {text!r}")
    if not low <= value <= high:
        sys.exit(f"{name} must be within {low:g}..{high:g}, got {value:g}")
    return value


def env_sizes(name: str, default: str) -> list[int]:
    text = os.environ.get(name) or default
    try:
        sizes = [int(word) for word in text.split()]
    except ValueError:
        sys.exit(f"{name} must be whole numbers, got {text!r}")
    if not sizes or not all(1 <= size <= 20000 for size in sizes):
        sys.exit(f"{name} must be 1..20000 each, got {text!r}")
    return sizes


def env_words(name: str, allowed: tuple[str, ...]) -> list[str]:
    words = os.environ.get(name, "").split() or list(allowed)
    for word in words:
        if word not in allowed:
            sys.exit(f"unknown value in {name}: {word!r} (choose from {' '.join(allowed)})")
    return words


@dataclass
class Settings:
    duration: float = field(default_factory=lambda: env_number("DURATION", 10, 1, 600))
    clients: int = field(default_factory=lambda: int(env_number("CLIENTS", 4, 1, 64)))
    crowd: int = field(default_factory=lambda: int(env_number("CROWD", 1000, 0, 20000)))
    bursts: list[int] = field(default_factory=lambda: env_sizes("BURST", "1500 3000 10000"))
    fire: int = field(default_factory=lambda: int(env_number("FIRE", 3000, 0, 20000)))
    abuse: int = field(default_factory=lambda: int(env_number("ABUSE", 20000, 0, 100000)))
    request_timeout: float = field(
        default_factory=lambda: env_number("REQUEST_TIMEOUT", 10, 0.1, 120)
    )
    servers: list[str] = field(default_factory=lambda: env_words("SERVERS", ALL_SERVERS))
    experiments: list[str] = field(
        default_factory=lambda: env_words("EXPERIMENTS", ALL_EXPERIMENTS)
    )
    venv: Path = field(
        default_factory=lambda: Path(os.environ.get("BENCH_VENV", "/tmp/trioherd-bench-venv"))
    )
    logdir: Path = field(
        default_factory=lambda: Path(
            os.environ.get("BENCH_LOGDIR") or tempfile.mkdtemp(prefix="trioherd-reliability.")
        )
    )
    results: Path | None = field(
        default_factory=lambda: Path(os.environ["RESULTS"]) if os.environ.get("RESULTS") else None
    )


# ------------------------------------------------------------------------- processes


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state is [0], ppid [1])."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            return file.read().rsplit(b")", 1)[1].decode().split()
    except (OSError, IndexError):
        return None


def alive(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = stat_fields(int(entry))
            if fields is not None and fields[1] == str(pid) and fields[0] != "Z":
                found.append(int(entry))
    return found


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    queue = [pid]
    while queue and len(found) < 10_000:
        kids = children(queue.pop())
        found += kids
        queue += kids
    return found


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def age(pid: int) -> float:
    """Seconds since PID started (0 if it is gone)."""
    fields = stat_fields(pid)
    if fields is None:
        return 0.0
    with open("/proc/uptime") as file:
        uptime = float(file.read().split()[0])
    return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ------------------------------------------------------------------------- servers


@dataclass
class Server:
    name: str
    command: list[str]
    port: int
    logfile: Path
    env: dict[str, str]
    reload: str | None  # None: the server has a rolling reload on SIGHUP; else why n/a
    process: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)

    def start(self) -> str | None:
        """Start and wait until it answers; None, or why it failed."""
        with open(self.logfile, "ab") as out:
            self.process = subprocess.Popen(
                self.command,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return f"exited {self.process.returncode} at start ({self.tail()})"
            if one_request(self.port, 2.0)[0] and len(self.workers()) >= WORKERS:
                return None
            time.sleep(0.1)
        return f"not answering with {WORKERS} workers within {START_TIMEOUT:g}s ({self.tail()})"

    def workers(self) -> list[int]:
        """The worker processes: children of the top process (not multiprocessing's
        resource tracker)."""
        if self.process is None:
            return []
        return [
            pid for pid in children(self.process.pid) if "resource_tracker" not in cmdline(pid)
        ]

    def stop(self) -> None:
        """SIGTERM the top process; SIGKILL whatever is left after STOP_TIMEOUT."""
        if self.process is None:
            return
        tree = descendants(self.process.pid)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline:
            tree = sorted(set(tree) | set(descendants(self.process.pid)))
            if self.process.poll() is not None and not any(alive(p) for p in tree):
                break
            time.sleep(0.05)
        left = [p for p in tree if alive(p)]
        if self.process.poll() is None:
            self.notes.append(f"still running {STOP_TIMEOUT:g}s after SIGTERM: SIGKILLed")
        elif left:
            self.notes.append(f"left {len(left)} processes behind: SIGKILLed")
        for pid in [self.process.pid, *left]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.exit_code = self.process.wait(10)

    def tail(self, lines: int = 3) -> str:
        try:
            text = self.logfile.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])[:300]


def make_server(name: str, settings: Settings, python: str, run: int) -> Server | str:
    """The server NAME, or why it is skipped."""
    port = free_port()
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    logfile = settings.logdir / f"{run:02d}-{name}.log"
    if name.startswith("trioherd"):
        runtime = settings.logdir / "runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        command = [python, "-m", "trioherd", "serve", "bench.hello_app:app"]
        command += ["--workers", str(WORKERS), "--bind", f"127.0.0.1:{port}"]
        command += ["--name", f"reliability-{os.getpid()}-{run}", "--log-level", "warning"]
        if name == "trioherd-shared":
            command += ["--dispatch", "shared"]
        return Server(name, command, port, logfile, env, None)
    if name == "gunicorn":
        if not module_available(python, "gunicorn") or not module_available(
            python, "uvicorn.workers"
        ):
            return "gunicorn or uvicorn.workers not importable in the venv"
        command = [python, "-m", "gunicorn", "-k", "uvicorn.workers.UvicornWorker"]
        command += ["-w", str(WORKERS), "-b", f"127.0.0.1:{port}", "--log-level", "warning"]
        return Server(name, [*command, "bench.hello_app:app"], port, logfile, env, None)
    if name == "uvicorn":
        if not module_available(python, "uvicorn"):
            return "uvicorn not importable in the venv"
        command = [python, "-m", "uvicorn", "--workers", str(WORKERS), "--host", "127.0.0.1"]
        command += ["--port", str(port), "--no-access-log", "--log-level", "warning"]
        reload = None if uvicorn_reloads_on_hup(python) else "uvicorn --workers has no reload"
        return Server(name, [*command, "bench.hello_app:app"], port, logfile, env, reload)
    node = shutil.which("node")
    if node is None:
        return "node not found on PATH"
    command = [node, str(BENCH_DIR / "node_cluster.js"), str(port), str(WORKERS)]
    return Server(name, command, port, logfile, env, None)


_available: dict[tuple[str, str], bool] = {}


def module_available(python: str, module: str) -> bool:
    key = (python, module)
    if key not in _available:
        check = subprocess.run(
            [python, "-c", f"import {module}"], capture_output=True, timeout=60, check=False
        )
        _available[key] = check.returncode == 0
    return _available[key]


def uvicorn_reloads_on_hup(python: str) -> bool:
    """Newer uvicorns restart all workers on SIGHUP in --workers mode."""
    check = subprocess.run(
        [
            python,
            "-c",
            "import uvicorn.supervisors.multiprocess as m; "
            "print(hasattr(m.Multiprocess, 'handle_hup'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return check.stdout.strip() == "True"


def setup_venv(settings: Settings) -> tuple[str, list[str]]:
    """The venv's python (created and filled if needed), and notes on what failed."""
    notes: list[str] = []
    python = str(settings.venv / "bin" / "python")
    if not os.access(python, os.X_OK):
        log(f"creating venv {settings.venv}")
        subprocess.run([sys.executable, "-m", "venv", str(settings.venv)], check=True)
    reinstall = bool(os.environ.get("BENCH_REINSTALL"))

    def pip(*args: str, what: str) -> bool:
        logfile = settings.logdir / f"pip-{what}.log"
        log(f"pip install {' '.join(args)}")
        with open(logfile, "wb") as out:
            done = subprocess.run(
                [python, "-m", "pip", "install", "-q", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=600,
                check=False,
            )
        if done.returncode != 0:
            notes.append(f"pip install {' '.join(args)} failed (see {logfile})")
        return done.returncode == 0

    if reinstall or not module_available(python, "trioherd"):
        if not pip("-e", str(REPO_ROOT), what="trioherd"):
            pip("trio", "h11", "attrs", what="trioherd-deps")
    peers = [p for p in ("gunicorn", "uvicorn") if p in settings.servers]
    if "gunicorn" in peers:
        peers.append("uvicorn")
    for peer in dict.fromkeys(peers):
        if reinstall or not module_available(python, peer):
            # uvicorn as its users run it: with uvloop and httptools
            pip("uvicorn[standard]" if peer == "uvicorn" else peer, what=peer)
            _available.pop((python, peer), None)
            _available.pop((python, "uvicorn.workers"), None)
    return python, notes


def versions(python: str) -> str:
    code = (
        "from importlib.metadata import version, PackageNotFoundError\n"
        "out = []\n"
        "for name in ('trioherd', 'trio', 'h11', 'gunicorn', 'uvicorn'):\n"
        "    try: out.append(f'{name} {version(name)}')\n"
        "    except PackageNotFoundError: out.append(f'{name} -')\n"
        "print(', '.join(out))\n"
    )
    python_version = subprocess.run(
        [python, "-V"], capture_output=True, text=True, timeout=60, check=False
    ).stdout.strip()
    packages = subprocess.run(
        [python, "-c", code], capture_output=True, text=True, timeout=60, check=False
    ).stdout.strip()
    node = shutil.which("node")
    node_version = ""
    if node:
        node_version = subprocess.run(
            [node, "--version"], capture_output=True, text=True, timeout=60, check=False
        ).stdout.strip()
    return f"{python_version}, {packages}, node {node_version or '-'}"


# ------------------------------------------------------------------------- clients


def one_request(port: int, timeout: float) -> tuple[bool, float, str]:
    """(ok, seconds, what went wrong): a GET on a new connection, read to EOF."""
    started = time.perf_counter()
    data = bytearray()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(REQUEST)
            while len(data) < 1 << 16:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
    except TimeoutError:
        return False, time.perf_counter() - started, "timeout"
    except ConnectionResetError:
        return False, time.perf_counter() - started, "reset"
    except ConnectionRefusedError:
        return False, time.perf_counter() - started, "refused"
    except OSError as exc:
        return False, time.perf_counter() - started, type(exc).__name__
    took = time.perf_counter() - started
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    if not data:
        return False, took, "closed without an answer"
    if not head.startswith(b"HTTP/1.1 200 "):
        return False, took, f"status {head[9:12].decode(errors='replace') or '?'}"
    if body != HELLO:
        return False, took, "incomplete answer"
    return True, took, ""


class Load:
    """CLIENTS threads sending GETs back to back on new connections until stopped."""

    def __init__(self, port: int, settings: Settings) -> None:
        self.port = port
        self.settings = settings
        self.latencies: list[float] = []
        self.in_window = 0  # successes that ended before stop() was called
        self.failures: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._client, daemon=True) for _ in range(settings.clients)
        ]
        self.started = self.ended = 0.0

    def _client(self) -> None:
        while not self._stop.is_set():
            ok, took, error = one_request(self.port, self.settings.request_timeout)
            with self._lock:
                if ok:
                    self.latencies.append(took)
                    if not self._stop.is_set():
                        self.in_window += 1
                else:
                    self.failures[error] += 1
            if not ok:  # a refused connection fails at once: do not spin on it
                self._stop.wait(0.01)

    def start(self) -> None:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        """Stop sending; wait for the requests still in flight (their timeout bounds it)."""
        if not self._stop.is_set():
            self.ended = time.monotonic()
            self._stop.set()
        for thread in self._threads:
            thread.join(self.settings.request_timeout + 5)


TRICKLE = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"x-pad: 1\r\n" * 2000


def burst(port: int, count: int, timeout: float) -> tuple[int, float]:
    """``count`` connections opened at once (non-blocking, one thread), each sending
    ``REQUEST`` and reading its answer to EOF: (answered with the 13-byte 200, seconds
    until the last of them was). Bounded by ``timeout`` in all."""
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, bytearray] = {}
    started = time.perf_counter()
    answered = 0
    last = 0.0
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            pending[sock] = bytearray()
            sel.register(sock, selectors.EVENT_WRITE)
        deadline = started + timeout
        while pending and time.perf_counter() < deadline:
            for key, events in sel.select(0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if events & selectors.EVENT_WRITE:
                    try:
                        sock.send(REQUEST)
                        sel.modify(sock, selectors.EVENT_READ)
                        continue
                    except OSError:
                        chunk = None
                else:
                    try:
                        chunk = sock.recv(65536)
                    except OSError:
                        chunk = None
                    if chunk:
                        pending[sock] += chunk
                        continue
                if chunk == b"" and pending[sock].endswith(b"\r\n\r\n" + HELLO):
                    answered += 1
                    last = time.perf_counter() - started
                sel.unregister(sock)
                sock.close()
                del pending[sock]
    finally:
        for sock in pending:
            sock.close()
        sel.close()
    return answered, last


def fire_and_close(port: int, count: int, timeout: float) -> tuple[int, float]:
    """``count`` connections one after another, each sending a GET and closing at once;
    then one GET: (connections made, seconds until that GET was answered, or -1)."""
    made = 0
    for _ in range(count):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
                sock.sendall(REQUEST)
                made += 1
        except OSError:
            pass
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        ok, _, _ = one_request(port, timeout)
        if ok:
            return made, time.perf_counter() - started
    return made, -1.0


class Crowd:
    """``size`` slowloris sockets in one thread: even ones trickle a request head one
    byte per 0.5 s, odd ones send nothing; a socket the server closes is reconnected."""

    def __init__(self, port: int, size: int) -> None:
        self.port = port
        self.size = size
        self.cut = 0
        self.opened = 0
        self.connect_errors = 0
        self.held = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _connect(self) -> socket.socket | None:
        try:
            sock = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        except OSError:
            self.connect_errors += 1
            return None
        sock.setblocking(False)
        self.opened += 1
        return sock

    def _run(self) -> None:
        socks: list[socket.socket | None] = [None] * self.size
        sent = [0] * self.size
        try:
            while not self._stop.is_set():
                reconnects = 0
                for i in range(self.size):
                    if self._stop.is_set():
                        break
                    sock = socks[i]
                    if sock is None:
                        if reconnects >= 200:  # the rest on the next pass
                            continue
                        reconnects += 1
                        sock = socks[i] = self._connect()
                        sent[i] = 0
                        if sock is None:
                            continue
                    try:
                        sock.recv(4096)  # EOF, an error answer or an error: cut
                        cut = True
                    except BlockingIOError:
                        cut = False
                    except OSError:
                        cut = True
                    if cut:
                        self.cut += 1
                        sock.close()
                        socks[i] = None
                        continue
                    if i % 2 == 0:
                        try:
                            sock.send(TRICKLE[sent[i] % len(TRICKLE) :][:1])
                            sent[i] += 1
                        except OSError:
                            pass  # seen as cut on the next pass
                self.held = sum(1 for s in socks if s is not None)
                self._stop.wait(0.5)
        finally:
            for sock in socks:
                if sock is not None:
                    sock.close()

    def start(self) -> None:
        self._thread.start()

    def wait_held(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.held < self.size:
            time.sleep(0.1)
        return self.held >= self.size

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)


# ------------------------------------------------------------------------- experiments


@dataclass
class Row:
    server: str
    status: str = "ok"  # ok, n/a, skipped, failed
    reason: str = ""
    requests: int = 0
    failures: int = 0
    failure_kinds: str = ""
    rps: float = 0.0
    p99_ms: float = 0.0
    events: str = ""
    recovered: str = ""
    notes: str = ""
    bursts: dict[int, tuple[int, float]] = field(default_factory=dict)
    abused: list[str] = field(default_factory=list)
    fired: tuple[int, float] = (0, 0.0)


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def signal_random_worker(server: Server, signum: int, rng: random.Random) -> bool:
    eligible = [pid for pid in server.workers() if age(pid) >= MIN_WORKER_AGE]
    if not eligible:
        return False
    try:
        os.kill(rng.choice(eligible), signum)
    except ProcessLookupError:
        return False
    return True


def at_times(times: list[float], action: Callable[[], bool], started: float) -> tuple[int, int]:
    """Run ``action`` at each of ``times`` (seconds after ``started``); (done, skipped)."""
    done = skipped = 0
    for moment in times:
        delay = started + moment - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        if action():
            done += 1
        else:
            skipped += 1
    return done, skipped


def run_experiment(experiment: str, server: Server, settings: Settings, rng: random.Random) -> Row:
    row = Row(LABELS[server.name])
    if experiment == "reload" and server.reload is not None:
        row.status, row.reason = "n/a", server.reload
        return row
    failure = server.start()
    if failure is not None:
        row.status, row.reason = "failed", f"did not start: {failure}"
        server.stop()
        return row
    duration = settings.duration
    crowd = None
    load = None
    blocker = None
    try:
        if experiment == "burst":
            run_bursts(row, server, settings)
            return row
        if experiment == "abuse":
            run_abuse(row, server, settings)
            return row
        if experiment == "blocked":
            blocker = Blocker(server.port, duration + 3)
            time.sleep(0.5)  # a worker takes it and blocks
            row.events = f"one worker blocked for {duration + 3:g} s"
        if experiment == "slowloris" and settings.crowd:
            crowd = Crowd(server.port, settings.crowd)
            crowd.start()
            if not crowd.wait_held(30):
                server.notes.append(f"crowd held only {crowd.held}/{settings.crowd} sockets")
        load = Load(server.port, settings)
        load.start()
        if experiment == "sigkill":
            times = [float(t) for t in range(1, max(2, int(duration)))]
            done, skipped = at_times(
                times, lambda: signal_random_worker(server, signal.SIGKILL, rng), load.started
            )
            row.events = f"{done} SIGKILLs" + (
                f" ({skipped} ticks: no worker ≥1 s old)" if skipped else ""
            )
        elif experiment == "sigterm":
            times = [duration * (i + 1) / 6 for i in range(5)]
            done, skipped = at_times(
                times, lambda: signal_random_worker(server, signal.SIGTERM, rng), load.started
            )
            row.events = f"{done} SIGTERMs" + (
                f" ({skipped} skipped: no worker ≥1 s old)" if skipped else ""
            )
        elif experiment == "reload":
            assert server.process is not None
            process = server.process

            def hup() -> bool:
                process.send_signal(signal.SIGHUP)
                return True

            times = [duration * (i + 1) / 4 for i in range(3)]
            done, _ = at_times(times, hup, load.started)
            row.events = f"{done} SIGHUPs"
        time.sleep(max(0.0, load.started + duration - time.monotonic()))
        load.stop()
        if crowd is not None:
            crowd.stop()
            row.events = (
                f"crowd of {settings.crowd}: {crowd.opened} connections, "
                f"{crowd.cut} cut by the server"
            )
        row.requests = len(load.latencies) + sum(load.failures.values())
        row.failures = sum(load.failures.values())
        row.failure_kinds = ", ".join(f"{k} {v}" for k, v in load.failures.most_common())
        row.rps = load.in_window / max(0.001, load.ended - load.started)
        row.p99_ms = percentile(load.latencies, 0.99) * 1000
        row.recovered = recovered(server)
    finally:  # also on an error or ^C: nothing keeps running
        if load is not None:
            load.stop()
        if crowd is not None:
            crowd.stop()
        server.stop()
        if blocker is not None:
            blocker.close()
        if server.exit_code not in (0, None):
            server.notes.append(f"exit code {server.exit_code} after SIGTERM")
        row.notes = "; ".join(server.notes)
    return row


class Blocker:
    """``GET /block?s=SECONDS`` on a connection of its own: the worker that takes it
    blocks its loop (bench/hello_app.py); the answer is never waited for."""

    def __init__(self, port: int, seconds: float) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.sendall(f"GET /block?s={seconds:g} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())

    def close(self) -> None:
        self.sock.close()


def run_bursts(row: Row, server: Server, settings: Settings) -> None:
    """The burst experiment on a started server (stopped by the caller)."""
    for size in settings.bursts:
        row.bursts[size] = burst(server.port, size, 60.0)
        log(f"burst {server.name}: {size} -> {row.bursts[size]}")
        time.sleep(1.0)  # the last burst's closes settle
    if settings.fire:
        row.fired = fire_and_close(server.port, settings.fire, 60.0)
    row.recovered = recovered(server)


ABUSES = (
    b"\x16\x03\x01garbage\r\n\r\n",  # not HTTP at all, then FIN
    REQUEST,  # a whole GET, then FIN (the answer is read)
    REQUEST[:20],  # half a head, then a half-close
    REQUEST[:20],  # half a head, then RST
)


def abuse_one(port: int, kind: int) -> None:
    """One abusive connection of ``kind`` (an index into ABUSES), read until the server
    closes it (at most 15 s)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
            sock.sendall(ABUSES[kind])
            if kind == 3:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return  # closed with an RST
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    except OSError:
        pass


def tree_usage(server: Server) -> tuple[int, float]:
    """(fds, RSS in MiB) of the server's top process and its workers, summed."""
    fds = 0
    rss = 0.0
    pids = [server.process.pid] if server.process is not None else []
    for pid in pids + server.workers():
        try:
            fds += len(os.listdir(f"/proc/{pid}/fd"))
            with open(f"/proc/{pid}/statm", "rb") as file:
                rss += int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, IndexError, ValueError):
            pass
    return fds, rss


def run_abuse(row: Row, server: Server, settings: Settings) -> None:
    """The abuse experiment on a started server (stopped by the caller)."""
    fds_before, rss_before = tree_usage(server)
    probes: list[tuple[bool, float]] = []
    done = threading.Event()

    def probe() -> None:
        while not done.wait(0.2):
            ok, took, _ = one_request(server.port, settings.request_timeout)
            probes.append((ok, took))

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    started = time.monotonic()
    kinds = list(range(len(ABUSES))) * (settings.abuse // len(ABUSES) + 1)
    with ThreadPoolExecutor(64) as pool:
        list(pool.map(lambda kind: abuse_one(server.port, kind), kinds[: settings.abuse]))
    took = time.monotonic() - started
    done.set()
    prober.join(settings.request_timeout + 5)
    time.sleep(2.0)
    fds_after, rss_after = tree_usage(server)
    failed = sum(1 for ok, _ in probes if not ok)
    slowest = max((t for _, t in probes), default=0.0) * 1000
    row.abused = [
        f"{took:.1f}",
        f"{len(probes) - failed}/{len(probes)}, slowest {slowest:.0f} ms",
        f"{fds_before} → {fds_after}",
        f"{rss_before:.0f} → {rss_after:.0f}",
    ]
    row.recovered = recovered(server)


def abuse_cells(row: Row) -> list[str]:
    return [*row.abused, row.recovered, row.notes]


def recovered(server: Server) -> str:
    deadline = time.monotonic() + RECOVER_TIMEOUT
    started = time.monotonic()
    while time.monotonic() < deadline:
        if server.process is not None and server.process.poll() is not None:
            return f"no: server exited {server.process.returncode}"
        if len(server.workers()) == WORKERS and one_request(server.port, 2.0)[0]:
            return f"yes ({time.monotonic() - started:.1f} s)"
        time.sleep(0.1)
    return f"no: {len(server.workers())} workers after {RECOVER_TIMEOUT:g} s"


# ------------------------------------------------------------------------- report


def report_table(
    heading: str, columns: list[str], rows: list[Row], cells: Callable[[Row], list[str]]
) -> list[str]:
    """A markdown table of ``rows``, one per server: ``heading`` above it, then a column
    per name in ``columns`` (a name ending in ``:`` is numeric, aligned right) filled by
    ``cells``; a server that did not run says why across the row."""
    names = [name.rstrip(":") for name in columns]
    lines = [heading, "", "| server | " + " | ".join(names) + " |"]
    lines.append("|---|" + "".join("---:|" if c.endswith(":") else "---|" for c in columns))
    for row in rows:
        if row.status != "ok":
            lines.append(
                f"| {row.server} | {row.status}: {row.reason} |" + " |" * (len(columns) - 1)
            )
        else:
            lines.append("| " + " | ".join([row.server, *cells(row)]) + " |")
    return [*lines, ""]


def burst_cells(row: Row, settings: Settings) -> list[str]:
    cells = []
    for n in settings.bursts:
        answered, last = row.bursts.get(n, (0, 0.0))
        cells.append(f"{last:.2f}" + ("" if answered == n else f" ({answered:,} answered)"))
    made, waited = row.fired
    fired = "—" if not settings.fire else ("none in 60 s" if waited < 0 else f"{waited:.2f}")
    if settings.fire and made < settings.fire:
        fired += f" ({made:,} connected)"
    return [*cells, fired, row.recovered, row.notes]


def chaos_cells(row: Row) -> list[str]:
    failures = f"{row.failures}" + (f" ({row.failure_kinds})" if row.failures else "")
    return [
        f"{row.requests:,}",
        failures,
        f"{row.rps:,.0f}",
        f"{row.p99_ms:.1f}",
        row.events,
        row.recovered,
        row.notes,
    ]


def table(experiment: str, rows: list[Row], settings: Settings) -> list[str]:
    heading = f"### {experiment}: {TITLES[experiment]}"
    if experiment == "burst":
        heading += (
            "\n\nSeconds until the last of N connections opened at once is answered (all"
            " answered unless said); then a GET after FIRE connections that send a GET and"
            " close."
        )
        columns = [f"N = {n:,}:" for n in settings.bursts]
        columns += [f"GET after {settings.fire:,} fire-and-close:", "recovered", "notes"]
        return report_table(heading, columns, rows, lambda row: burst_cells(row, settings))
    if experiment == "abuse":
        heading += (
            f"\n\n{settings.abuse:,} abusive connections from 64 threads; a GET every 0.2 s"
            " meanwhile; fds and RSS (MiB) of the server's processes before, and 2 s after."
        )
        columns = ["seconds:", "GETs answered", "fds", "RSS MiB", "recovered", "notes"]
        return report_table(heading, columns, rows, abuse_cells)
    columns = ["requests:", "failures:", "req/s:", "p99 ms:", "chaos", "recovered", "notes"]
    return report_table(heading, columns, rows, chaos_cells)


def raise_fd_limit(needed: int) -> str:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return ""
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < needed:
        return f"RLIMIT_NOFILE hard limit {hard} < {needed}: the crowd may not fit"
    return ""


def main() -> None:
    settings = Settings()
    settings.logdir.mkdir(parents=True, exist_ok=True)
    results = settings.results or settings.logdir / "reliability.md"
    notes = []
    if note := raise_fd_limit(max([settings.crowd, *settings.bursts]) + 4096):
        notes.append(note)
    python, pip_notes = setup_venv(settings)
    notes += pip_notes
    seed = int(env_number("SEED", random.randrange(1, 2**31), 0, 2**63))
    rng = random.Random(seed)
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    load_start = Path("/proc/loadavg").read_text().split()[:3]
    report = [
        "# trioherd reliability under chaos, latest run",
        "",
        f"- started {started}; {settings.duration:g} s per experiment, {settings.clients} "
        f"clients (new connection per request), crowd {settings.crowd}, {WORKERS} workers, "
        f"SEED={seed}",
        f"- machine: {os.cpu_count()} CPUs, load average at start {' '.join(load_start)}",
        f"- {versions(python)}",
        *[f"- {note}" for note in notes],
        "",
    ]
    run = 0
    for experiment in settings.experiments:
        rows = []
        order = (
            settings.servers[run % len(settings.servers) :]
            + settings.servers[: run % len(settings.servers)]
        )  # rotated per experiment, so that no server always runs first
        for name in order:
            run += 1
            server = make_server(name, settings, python, run)
            if isinstance(server, str):
                rows.append(Row(LABELS[name], status="skipped", reason=server))
                log(f"{experiment} {name}: skipped: {server}")
                continue
            log(f"{experiment} {name}: port {server.port}, log {server.logfile}")
            row = run_experiment(experiment, server, settings, rng)
            log(
                f"{experiment} {name}: {row.status} {row.reason} requests {row.requests} "
                f"failures {row.failures} {row.failure_kinds} {row.rps:.0f} req/s "
                f"p99 {row.p99_ms:.1f} ms; {row.events}; recovered {row.recovered}; {row.notes}"
            )
            rows.append(row)
        rows.sort(
            key=lambda r: settings.servers.index(
                next(n for n, label in LABELS.items() if label == r.server)
            )
        )
        report += table(experiment, rows, settings)
    text = "\n".join(report)
    results.write_text(text + "\n")
    print(text)
    log(f"written to {results}; server logs in {settings.logdir}")


if __name__ == "__main__":
    main()
