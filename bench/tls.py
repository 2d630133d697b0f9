"""TLS figures that wrk does not give (issue 25), trioherd against its peers, interleaved
rounds, medians: new connections that resume their session against full handshakes, and
a 100 MB download and upload.

    /tmp/trioherd-bench-venv/bin/python bench/tls.py
    /tmp/trioherd-bench-venv/bin/python bench/tls.py --rounds 5 --seconds 5 --mb 100

Every server (``--servers``: trioherd, uvicorn-httptools and granian by default;
trioherd-shared is trioherd with ``--dispatch shared``) serves bench/transfer_app.py with
2 workers over https on 127.0.0.1, with a trustme certificate made for the run (needs
trustme where this runs; bench/run.sh's venv has it once a tls- mode ran). Per server and
round:

- ``openssl s_time -new`` and ``-reuse``, ``--clients`` of each at once for ``--seconds``:
  connections per second (a TLS 1.3 handshake, ``GET /`` over HTTP/1.0, the close), the
  server's CPU per connection (every process of its tree, from /proc), and for -reuse the
  share of connections that resumed (s_time prints ``r`` for each);
- ``curl`` fetching ``/download?mb=N`` and posting N MiB to ``/upload``: MB/s as curl
  measures it (its ``speed_download``, ``speed_upload``; 1 MB = 10^6 bytes).

trioherd runs with ``--max-body-size`` above the upload (its default, 16 MiB, would refuse
it: 413); uvicorn and granian have no limit by default.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
APP = "bench.transfer_app:app"
SERVERS = ("trioherd", "uvicorn-httptools", "granian", "trioherd-shared")
DEFAULT_SERVERS = "trioherd uvicorn-httptools granian"
LABELS = {
    "trioherd": "trioherd",
    "trioherd-shared": "trioherd --dispatch shared",
    "uvicorn-httptools": "uvicorn --http httptools --loop uvloop",
    "granian": "granian (Rust, rustls)",
}
REFERENCE = "uvicorn-httptools"


def command(name: str, venv: Path, port: int, certs: Path, mb: int) -> list[str]:
    py = str(venv / "bin" / "python")
    cert, key = str(certs / "cert.pem"), str(certs / "key.pem")
    if name.startswith("trioherd"):
        return [
            py,
            "-m",
            "trioherd",
            "serve",
            APP,
            "--workers",
            "2",
            "--bind",
            f"127.0.0.1:{port}",
            "--name",
            f"bench-tls-{port}",
            "--certfile",
            cert,
            "--keyfile",
            key,
            "--max-body-size",
            str((mb + 1) << 20),
            *(["--dispatch", "shared"] if name == "trioherd-shared" else []),
        ]
    if name == "uvicorn-httptools":
        return [
            py,
            str(BENCH / "uvicorn_nodelay.py"),
            "--http",
            "httptools",
            "--loop",
            "uvloop",
            "--workers",
            "2",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-access-log",
            "--log-level",
            "warning",
            "--ssl-certfile",
            cert,
            "--ssl-keyfile",
            key,
            APP,
        ]
    return [
        str(venv / "bin" / "granian"),
        "--interface",
        "asgi",
        "--workers",
        "2",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-ws",
        "--log-level",
        "warning",
        "--ssl-certificate",
        cert,
        "--ssl-keyfile",
        key,
        APP,
    ]


def make_certs(directory: Path) -> None:
    import trustme
    from cryptography.hazmat.primitives import serialization

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(directory / "ca.pem")
    (directory / "cert.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    (directory / "key.pem").write_bytes(  # PKCS#8: granian reads no other form
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers(port: int, certs: Path) -> bool:
    context = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=1) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := tls.recv(65536):
                data += chunk
    except OSError:
        return False
    return data.endswith(b"Hello, World!")


def tree_ticks(root: int) -> int:
    """utime + stime of ``root`` and all its descendants, in clock ticks."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(entry))
    total, queue = 0, [root]
    while queue:
        pid = queue.pop()
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
        queue += children.get(pid, [])
    return total


def s_time(
    port: int, certs: Path, how: str, clients: int, seconds: int, root: int
) -> dict[str, float]:
    """``clients`` openssl s_time at once (``how``: -new or -reuse)."""
    before, started = tree_ticks(root), time.monotonic()
    runs = [
        subprocess.Popen(
            [
                "openssl",
                "s_time",
                "-connect",
                f"127.0.0.1:{port}",
                "-www",
                "/",
                how,
                "-time",
                str(seconds),
                "-CAfile",
                str(certs / "ca.pem"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(clients)
    ]
    outputs = [run.communicate(timeout=seconds + 60)[0] for run in runs]
    wall, used = time.monotonic() - started, tree_ticks(root) - before
    connections = 0
    for out in outputs:
        found = re.search(r"(\d+) connections in \d+ real seconds", out)
        if found is None:
            raise RuntimeError(f"openssl s_time said: {out[-500:]}")
        connections += int(found.group(1))
    # a mark per connection: "r" resumed, "*" a full handshake
    marks = "".join("".join(re.findall(r"^[r*]+$", out, re.MULTILINE)) for out in outputs)
    resumed, fresh = marks.count("r"), marks.count("*")
    return {
        "rate": connections / wall,
        "cpu": used / os.sysconf("SC_CLK_TCK") * 1e6 / max(connections, 1),
        "resumed": resumed / max(resumed + fresh, 1),
    }


def transfer(port: int, certs: Path, mb: int, upload: Path) -> tuple[float, float]:
    """MB/s of one download and one upload of ``mb`` MiB (curl's figures)."""
    base = f"https://127.0.0.1:{port}"
    curl = ["curl", "-s", "--cacert", str(certs / "ca.pem"), "--max-time", "300"]
    down = subprocess.run(
        [
            *curl,
            "-o",
            "/dev/null",
            "-w",
            "%{speed_download} %{size_download}",
            f"{base}/download?mb={mb}",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if int(float(down[1])) != mb << 20:
        raise RuntimeError(f"download of {down[1]} bytes, not {mb << 20}")
    up = subprocess.run(
        [
            *curl,
            "-H",
            "Expect:",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            f"@{upload}",
            "-w",
            "\n%{speed_upload}",
            f"{base}/upload",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    if up[0] != str(mb << 20):
        raise RuntimeError(f"the server read {up[0]} bytes of {mb << 20}")
    return float(down[0]) / 1e6, float(up[1]) / 1e6


def measure(name: str, args: argparse.Namespace, certs: Path, upload: Path) -> dict[str, float]:
    port = free_port()
    log = open(Path(args.logs) / f"{name}-{port}.log", "w")  # closed in the finally below
    server = subprocess.Popen(
        command(name, Path(args.venv), port, certs, args.mb),
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=log,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while not answers(port, certs):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not answer (see {log.name})")
            time.sleep(0.05)
        full = s_time(port, certs, "-new", args.clients, args.seconds, server.pid)
        reuse = s_time(port, certs, "-reuse", args.clients, args.seconds, server.pid)
        down, up = transfer(port, certs, args.mb, upload)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(15)
        log.close()
    return {
        "new": full["rate"],
        "new_cpu": full["cpu"],
        "reuse": reuse["rate"],
        "reuse_cpu": reuse["cpu"],
        "resumed": reuse["resumed"],
        "down": down,
        "up": up,
    }


def report(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    def med(name: str, key: str) -> float:
        return statistics.median(run[key] for run in results[name])

    ref = REFERENCE if results.get(REFERENCE) else None
    lines = [
        f"{args.rounds} rounds, medians; {args.clients} `openssl s_time` at once for "
        f"{args.seconds} s; {args.mb} MiB down and up with curl; 2 workers each; "
        f"load average at start {args.load}",
        "",
        "| server | full handshakes /s | CPU µs each | resumed /s | resumed | CPU µs each "
        "| download MB/s | upload MB/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, runs in results.items():
        if not runs:
            continue
        cells = []
        for key, form in (
            ("new", ",.0f"),
            ("new_cpu", ".0f"),
            ("reuse", ",.0f"),
            ("resumed", ".0%"),
            ("reuse_cpu", ".0f"),
            ("down", ".0f"),
            ("up", ".0f"),
        ):
            value = med(name, key)
            cell = format(value, form)
            if ref and name != ref and key in ("new", "reuse", "down", "up"):
                cell += f" ({value / med(ref, key):.2f}x)"
            cells.append(cell)
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--servers", default=DEFAULT_SERVERS, help=" ".join(SERVERS))
    parser.add_argument("--venv", default=os.environ.get("BENCH_VENV", "/tmp/trioherd-bench-venv"))
    args = parser.parse_args()
    servers = args.servers.split()
    if unknown := set(servers) - set(SERVERS):
        sys.exit(f"unknown servers: {sorted(unknown)}")
    args.load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    with tempfile.TemporaryDirectory(prefix="trioherd-bench-tls-") as tmp:
        certs, args.logs = Path(tmp), tmp
        make_certs(certs)
        upload = certs / "upload.bin"
        upload.write_bytes(os.urandom(1 << 20) * args.mb)
        results: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
        for index in range(args.rounds):
            for k in range(len(servers)):  # the order rotates every round
                name = servers[(k + index) % len(servers)]
                found = measure(name, args, certs, upload)
                print(
                    f"[tls] round {index + 1} {name}: "
                    + ", ".join(f"{key} {value:,.2f}" for key, value in found.items()),
                    file=sys.stderr,
                )
                results[name].append(found)
    print(report(results, args))


if __name__ == "__main__":
    main()
