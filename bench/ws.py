"""WebSocket benchmark: echo round trips per second and messages per second with many
connections, trioherd (2 workers) against uvicorn (``--ws websockets``,
``websockets-sansio`` and ``wsproto``, on uvloop) and hypercorn (``-k trio``), all
serving the same ASGI echo app (this module's ``app``), in one session, interleaved,
measured by one client (this module's, below).
Traffic goes to 127.0.0.1 only; every run is bounded in time.

    python bench/ws.py                              # 5 s per run, 1 round
    python bench/ws.py --duration 10 --rounds 3     # medians of 3 rounds
    python bench/ws.py --servers trioherd,uvicorn-wsproto --modes rtt

Modes (the client sends 32-byte text messages, masked, without compression):

- ``rtt``: 64 connections, one message in flight on each: echo round trips per second;
- ``stream``: 256 connections, 8 messages in flight on each: messages per second.

Servers: ``trioherd`` (the ASGI app), ``trioherd-native`` (the same echo with trioherd's
native API), ``uvicorn-websockets`` (the deprecated implementation),
``uvicorn-websockets-sansio`` (uvicorn's current default) and ``uvicorn-wsproto`` (all with
uvloop and httptools, as uvicorn[standard] runs, and TCP_NODELAY patched in, as
bench/run.sh does: bench/uvicorn_nodelay.py) and ``hypercorn`` (``-k trio``), each with 2
workers. Peers are installed into
``${BENCH_VENV:-/tmp/trioherd-bench-venv}`` (with this repository, ``pip install -e``),
once; ``--reinstall`` installs them again. A peer that cannot be installed is skipped.

The client is a single process of plain non-blocking sockets and epoll: each message is a
frame built once, each echo is counted by parsing the frame headers, so the client costs
a small fraction of what any server spends on a message (the servers all parse and mask in
Python). It shares the 2 cores with the server's workers, the same for every server.
"""

from __future__ import annotations

import argparse
import os
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
MODES = {"rtt": (64, 1), "stream": (256, 8)}  # connections, messages in flight on each
SERVERS = (
    "trioherd",
    "trioherd-native",
    "uvicorn-websockets",
    "uvicorn-websockets-sansio",
    "uvicorn-wsproto",
    "hypercorn",
)
# uvicorn as its users run it (uvicorn[standard]): uvloop and httptools
PEER_PACKAGES = ["uvicorn", "uvloop", "httptools", "websockets", "wsproto", "hypercorn"]
SIZE = 32
WARMUP = 1.0
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0

# -- the app every server runs (ASGI), and trioherd's native one ----------------------------


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Echo every WebSocket message; lifespan is acknowledged."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            kind = message["type"].rpartition(".")[2]
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        text = message.get("text")
        if text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes")})


async def native(request: Any) -> Any:
    """The same echo with trioherd's native API."""
    ws = await request.accept_websocket()
    async for message in ws:
        await ws.send(message)
    return None


# -- the client -----------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    """A masked text frame (the mask need not be unpredictable here)."""
    key = b"\x12\x34\x56\x78"
    head = bytes([0x81, 0x80 | len(payload)]) if len(payload) < 126 else b""
    assert head, "payloads under 126 bytes only"
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def _handshake(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(
        b"GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the handshake")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"handshake refused: {head[:60]!r}")
    if head.partition(b"\r\n\r\n")[2]:
        raise ConnectionError("data right after the handshake")
    sock.setblocking(False)
    return sock


def _messages_in(buffer: bytearray) -> int:
    """Count the complete data frames at the start of ``buffer`` and remove them (control
    frames, such as a ping, are skipped)."""
    count = pos = 0
    size = len(buffer)
    while size - pos >= 2:
        length = buffer[pos + 1] & 0x7F
        head = 2
        if length == 126:
            if size - pos < 4:
                break
            length, head = int.from_bytes(buffer[pos + 2 : pos + 4], "big"), 4
        elif length == 127:
            if size - pos < 10:
                break
            length, head = int.from_bytes(buffer[pos + 2 : pos + 10], "big"), 10
        end = pos + head + length
        if end > size:
            break
        if buffer[pos] & 0x8F in (0x81, 0x82, 0x80):  # FIN and a data opcode
            count += 1
        pos = end
    del buffer[:pos]
    return count


def measure(
    port: int,
    connections: int,
    window: int,
    duration: float,
    cpu: Callable[[], float] = lambda: 0.0,
) -> tuple[float, float]:
    """Messages echoed per second, after a warm-up, with ``window`` in flight on each of
    ``connections`` connections; and the server's CPU seconds per message (``cpu()``: the
    server's CPU seconds so far)."""
    frame = _frame(b"x" * SIZE)
    selector = selectors.DefaultSelector()
    socks = [_handshake(port) for _ in range(connections)]
    pending: dict[socket.socket, bytearray] = {}  # what the kernel did not take yet
    buffers = {sock: bytearray() for sock in socks}
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
        _send(sock, frame * window, pending, selector)
    counted = 0
    started = time.monotonic()
    measuring_from = started + WARMUP
    deadline = measuring_from + duration
    measuring = False
    cpu_from = 0.0
    try:
        while True:
            now = time.monotonic()
            if not measuring and now >= measuring_from:
                measuring, counted, cpu_from = True, 0, cpu()
            if now >= deadline:
                break
            for key, events in selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if events & selectors.EVENT_WRITE:
                    _send(sock, b"", pending, selector)
                if events & selectors.EVENT_READ:
                    data = sock.recv(262144)
                    if not data:
                        raise ConnectionError("the server closed a connection")
                    buffer = buffers[sock]
                    buffer += data
                    echoed = _messages_in(buffer)
                    if echoed:
                        counted += echoed
                        _send(sock, frame * echoed, pending, selector)
        used = cpu() - cpu_from
        return counted / (time.monotonic() - measuring_from), used / max(counted, 1)
    finally:
        for sock in socks:
            selector.unregister(sock)
            sock.close()
        selector.close()


def _send(
    sock: socket.socket,
    data: bytes,
    pending: dict[socket.socket, bytearray],
    selector: selectors.BaseSelector,
) -> None:
    queued = pending.get(sock)
    if queued is not None:  # still waiting to write: keep the order
        queued += data
        data = bytes(queued)
    try:
        sent = sock.send(data) if data else 0
    except BlockingIOError:
        sent = 0
    rest = data[sent:]
    if rest:
        pending[sock] = bytearray(rest)
        selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    elif queued is not None:
        del pending[sock]
        selector.modify(sock, selectors.EVENT_READ)


# -- servers ---------------------------------------------------------------------------------


def venv_python(venv: Path, reinstall: bool) -> tuple[Path, set[str]]:
    """The bench venv's python (created and filled if needed), and the servers it has."""
    python = venv / "bin" / "python"
    if not python.exists():
        print(f"[bench] creating venv {venv}", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q"]
    have = {"trioherd", "trioherd-native"}
    if reinstall or subprocess.run([*pip[:3], "show", "-q", "wsproto"]).returncode:
        print(f"[bench] pip install -e {ROOT}", file=sys.stderr)
        subprocess.run([*pip, "-e", str(ROOT)], check=True)
    for package in PEER_PACKAGES:
        present = not subprocess.run(
            [*pip[:3], "show", "-q", package], capture_output=True
        ).returncode
        if reinstall or not present:
            print(f"[bench] pip install {package}", file=sys.stderr)
            present = not subprocess.run([*pip, package], capture_output=True).returncode
        if present and package == "hypercorn":
            have.add("hypercorn")
    installed = _installed(python)
    if {"uvicorn", "uvloop", "httptools"} <= installed:
        if "websockets" in installed:  # the legacy implementation and the sans-IO one
            have.update(("uvicorn-websockets", "uvicorn-websockets-sansio"))
        if "wsproto" in installed:
            have.add("uvicorn-wsproto")
    return python, have


def _installed(python: Path) -> set[str]:
    """Which of uvicorn's WebSocket implementations the venv can import."""
    code = (
        "import importlib.util as u\n"
        "names = ('uvicorn', 'uvloop', 'httptools', 'websockets', 'wsproto')\n"
        "print(*[n for n in names if u.find_spec(n)])"
    )
    result = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return set(result.stdout.split())


def server_command(name: str, python: Path, port: int) -> list[str]:
    bind = f"127.0.0.1:{port}"
    if name.startswith("trioherd"):
        target = "bench.ws:native" if name == "trioherd-native" else "bench.ws:app"
        return [
            str(python),
            "-m",
            "trioherd",
            "serve",
            target,
            "--workers",
            "2",
            "--bind",
            bind,
            "--log-level",
            "warning",
            "--name",
            f"bench-ws-{os.getpid()}",
        ]
    if name.startswith("uvicorn"):
        return [
            str(python),
            str(BENCH / "uvicorn_nodelay.py"),
            "bench.ws:app",
            "--workers",
            "2",
            "--loop",
            "uvloop",
            "--http",
            "httptools",
            "--ws",
            name.partition("-")[2],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ]
    return [str(python.parent / "hypercorn"), "-k", "trio", "-w", "2", "-b", bind, "bench.ws:app"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tree_cpu(root: int) -> float:
    """CPU seconds (user + system) used so far by process ``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                fields = file.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
        ticks[int(entry)] = int(fields[11]) + int(fields[12])
    total, stack = 0, [root]
    while stack:
        pid = stack.pop()
        total += ticks.get(pid, 0)
        stack.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


def run_server(
    name: str, python: Path, mode: str, duration: float, logdir: Path
) -> tuple[float, float]:
    """Start server ``name``, measure ``mode`` once, stop it: messages per second, and
    the server's CPU seconds per message."""
    port = _free_port()
    log = open(logdir / f"{name}-{mode}-{port}.log", "wb")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    process = subprocess.Popen(
        server_command(name, python, port),
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                _handshake(port).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not start: see {log.name}") from None
                time.sleep(0.1)
        connections, window = MODES[mode]
        return measure(port, connections, window, duration, lambda: tree_cpu(process.pid))
    finally:
        _stop(process)
        log.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    with _suppress_lookup():
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    with _suppress_lookup():
        os.killpg(process.pid, signal.SIGKILL)  # workers left behind, if any
    process.wait()


class _suppress_lookup:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: object, *rest: object) -> bool:
        return kind is ProcessLookupError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured per run")
    parser.add_argument("--rounds", type=int, default=1, help="rounds, servers rotated")
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--reinstall", action="store_true", help="pip install peers again")
    args = parser.parse_args()
    if not (0.5 <= args.duration <= 120 and 1 <= args.rounds <= 20):
        parser.error("--duration must be 0.5..120 s and --rounds 1..20")
    servers = [s for s in args.servers.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    if unknown := set(servers) - set(SERVERS) | set(modes) - set(MODES):
        parser.error(f"unknown server or mode: {', '.join(sorted(unknown))}")
    venv = Path(os.environ.get("BENCH_VENV", "/tmp/trioherd-bench-venv"))
    python, have = venv_python(venv, args.reinstall)
    skipped = [s for s in servers if s not in have]
    servers = [s for s in servers if s in have]
    logdir = Path(os.environ.get("BENCH_LOGDIR") or _mkdtemp())
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for round_ in range(args.rounds):
        order = servers[round_ % len(servers) :] + servers[: round_ % len(servers)]
        for mode in modes:
            for name in order:
                rate, cpu = run_server(name, python, mode, args.duration, logdir)
                results.setdefault((name, mode), []).append((rate, cpu))
                print(
                    f"[bench] round {round_ + 1} {mode:6} {name:20} {rate:10,.0f} msg/s "
                    f"{cpu * 1e6:6.1f} us CPU/msg",
                    file=sys.stderr,
                    flush=True,
                )
    print(report(servers, modes, results, args, skipped))
    print(f"\nserver logs: {logdir}", file=sys.stderr)


def _mkdtemp() -> str:
    import tempfile

    return tempfile.mkdtemp(prefix="trioherd-bench-ws.")


def _mode_title(mode: str) -> str:
    connections, window = MODES[mode]
    return f"{mode} ({connections} conns x {window} in flight)"


def report(
    servers: list[str],
    modes: list[str],
    results: dict[tuple[str, str], list[tuple[float, float]]],
    args: argparse.Namespace,
    skipped: list[str],
) -> str:
    """Markdown tables of medians (messages per second, and the server's CPU per message,
    which depends less on what else the machine runs), and trioherd's ratios to each peer."""
    rate = {key: statistics.median(r for r, _ in runs) for key, runs in results.items()}
    cpu = {key: statistics.median(c for _, c in runs) * 1e6 for key, runs in results.items()}
    lines = [
        f"WebSocket echo, {SIZE}-byte text messages, 2 workers each, {args.duration:g} s per "
        f"run, median of {args.rounds} round(s): messages per second (server CPU us per "
        "message, all its processes)",
        "",
        "| server | " + " | ".join(_mode_title(m) for m in modes) + " |",
        "|---|" + "---:|" * len(modes),
    ]
    for name in servers:
        cells = [f"{rate[(name, m)]:,.0f} ({cpu[(name, m)]:.1f} us)" for m in modes]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    for ours in ("trioherd", "trioherd-native"):
        if ours not in servers:
            continue
        lines += [
            "",
            f"| {ours} / peer: msg/s (CPU per msg, below 1 = less) | " + " | ".join(modes) + " |",
            "|---|" + "---:|" * len(modes),
        ]
        for name in servers:
            if not name.startswith("trioherd"):
                cells = [
                    f"{rate[(ours, m)] / rate[(name, m)]:.2f}x "
                    f"({cpu[(ours, m)] / cpu[(name, m)]:.2f}x)"
                    for m in modes
                ]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", f"skipped (could not be installed): {', '.join(skipped)}"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
