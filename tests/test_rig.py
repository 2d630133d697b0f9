"""The multi-host rig (issue 11): herds on three hosts behind HAProxy, under load.

Every host is a network namespace the test makes: a load balancer namespace holds a bridge
(10.231.0.1/24) and one veth pair to each of the others, the client (10.231.0.10) and
three hosts (10.231.0.11 to .13). Nothing is routed outside these namespaces, and their names
carry this process's pid and a random suffix, so parallel runs do not collide and a run
that died without cleaning up is reaped by the next one. Each host runs its own herd
(`--proxy-protocol`, readiness on `--metrics-bind 0.0.0.0:9100`); HAProxy runs
tests/rig/haproxy.cfg (which docs/deploy.md shows verbatim) in the load balancer's
namespace, and wrk (tests/rig/load.lua) loads it from the client's namespace.

Run it as root: ``python3 -m pytest tests/test_rig.py -s`` prints the figures of every
scenario. Without root, ``ip netns``, haproxy or wrk, the tests skip and say which is
missing.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest

from helpers import ROOT, TESTS, wait_until

RIG = TESTS / "rig"
HAPROXY_CFG = RIG / "haproxy.cfg"
LOAD_LUA = RIG / "load.lua"
DEPLOY_MD = ROOT / "docs" / "deploy.md"

LB_ADDRESS = "10.231.0.1"
CLIENT_ADDRESS = "10.231.0.10"
HOSTS = {"host1": "10.231.0.11", "host2": "10.231.0.12", "host3": "10.231.0.13"}  # haproxy.cfg
APP_PORT, HEALTH_PORT, FRONT_PORT, STATS_PORT = 8000, 9100, 80, 8404

# what each host runs (inside its namespace, with PYTHONPATH=tests:. and its own
# XDG_RUNTIME_DIR), and the load (in the client's namespace, until SIGINT)
HERD = (
    "-m trioherd serve apps.http_apps:native --bind 0.0.0.0:8000 --metrics-bind 0.0.0.0:9100"
    " --proxy-protocol --proxy-protocol-allow-ips 10.231.0.1 --name {name} --workers 2"
)
WRK = "-t1 -c{connections} -d120s --timeout 10s -s {script} http://10.231.0.1:80/"
# the load: CONNECTIONS keep-alive connections, each pausing PAUSE_MS between requests
CONNECTIONS = 16
PAUSE_MS = 5
WARM_UP = 1.5  # seconds of load before the first disruption, and at least after the last
LOAD_SECONDS = 10  # how long each scenario keeps the load on, at least
STALE = re.compile(r"^thrig(\d+)x[0-9a-f]{4}-")
CLONE_NEWNET = 0x40000000


def missing() -> str | None:
    """Why the rig cannot run here, or None."""
    if os.geteuid() != 0:
        return "the multi-host rig needs root (it makes network namespaces)"
    if shutil.which("ip") is None:
        return "the multi-host rig needs `ip` (iproute2) for network namespaces"
    probe = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"`ip netns` does not work here: {probe.stderr.strip()}"
    for tool in ("haproxy", "wrk"):
        if which(tool) is None:
            return f"the multi-host rig needs {tool} (apt-get install {tool})"
    return None


def which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def namespace_pids(namespace: str) -> list[int]:
    out = ip("netns", "pids", namespace, check=False).stdout
    return [int(pid) for pid in out.split()]


def remove_namespace(namespace: str) -> None:
    """Kill what still runs in ``namespace``, then delete it (with its veth ends)."""
    for pid in namespace_pids(namespace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not namespace_pids(namespace), 10)
    ip("netns", "del", namespace, check=False)


def reap_stale_namespaces() -> None:
    """Remove the namespaces of rigs whose test process is gone (a run that was killed)."""
    for line in ip("netns", "list").stdout.splitlines():
        name = line.split(" ", 1)[0]
        match = STALE.match(name)
        if match is None:
            continue
        try:
            os.kill(int(match.group(1)), 0)
        except ProcessLookupError:
            remove_namespace(name)
        except PermissionError:
            pass


_libc = ctypes.CDLL(None, use_errno=True)


def socket_in(namespace: str) -> socket.socket:
    """A TCP socket of ``namespace``'s network stack, made by a short-lived thread that
    joins the namespace (setns affects only the calling thread; the socket keeps the
    namespace it was made in)."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            with open(f"/run/netns/{namespace}") as file:
                if _libc.setns(file.fileno(), CLONE_NEWNET) != 0:
                    errno = ctypes.get_errno()
                    raise OSError(errno, f"setns {namespace}: {os.strerror(errno)}")
            made.append(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=make)
    thread.start()
    thread.join()
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    local_port: int


def http_get(namespace: str, address: tuple[str, int], path: str, timeout: float = 5) -> Reply:
    """GET ``path`` from ``address``, on a new connection from ``namespace``."""
    with socket_in(namespace) as sock:
        sock.settimeout(timeout)
        sock.connect(address)
        local_port = sock.getsockname()[1]
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: rig\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    if headers.get("transfer-encoding") == "chunked":
        body = dechunk(body)
    return Reply(int(lines[0].split(" ")[1]), headers, body, local_port)


def dechunk(data: bytes) -> bytes:
    body = b""
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            break
        body, data = body + data[:size], data[size + 2 :]
    return body


def status_of(namespace: str, address: tuple[str, int], path: str) -> int | None:
    try:
        return http_get(namespace, address, path, timeout=2).status
    except (OSError, ValueError, IndexError):
        return None


@dataclass
class LoadResult:
    """wrk's summary. Its percentiles are corrected for coordinated omission (wrk's
    ``stats_correct``): a request that took 1 s on a connection that sends one about every
    7 ms also counts as the ~140 requests that connection would have sent meanwhile, each
    with the time it would have waited. A handful of slow requests therefore move p99."""

    requests: int
    failed: int  # connect, read, write errors, timeouts and answers >= 400 (wrk's counts)
    errors: dict[str, int]
    seconds: float
    p50_ms: float
    p99_ms: float
    max_ms: float

    def __str__(self) -> str:
        return (
            f"{self.requests} requests in {self.seconds:.1f} s, {self.failed} failed"
            f" {self.errors}, p50 {self.p50_ms:.1f} ms, p99 {self.p99_ms:.1f} ms,"
            f" max {self.max_ms:.1f} ms (wrk's percentiles, corrected for coordinated"
            " omission)"
        )


class Host:
    """One host: a namespace with a herd serving apps.http_apps:native on it."""

    def __init__(self, rig: Rig, name: str, address: str):
        self.rig, self.name, self.address = rig, name, address
        self.namespace = rig.namespace(name)
        self.runtime_dir = rig.directory / f"run-{name}"  # its control socket
        self.runtime_dir.mkdir(mode=0o700)
        self.log = rig.open(f"{name}.log")
        self.process: subprocess.Popen[bytes] | None = None
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT)])
        self.env["XDG_RUNTIME_DIR"] = str(self.runtime_dir)

    def start(self) -> None:
        self.log.write(f"---- {time.strftime('%H:%M:%S')} rig: starting {self.name}\n".encode())
        self.log.flush()
        self.process = self.rig.spawn(
            self.namespace,
            [sys.executable, *HERD.format(name=self.name).split()],
            self.log,
            self.env,
        )

    def readyz(self) -> int | None:
        return status_of(self.rig.lb, (self.address, HEALTH_PORT), "/readyz")

    def wait_ready(self, timeout: float = 30) -> None:
        assert wait_until(lambda: self.readyz() == 200 or self.exited(), timeout, 0.05), (
            f"{self.name} not ready in {timeout} s:\n{self.rig.logs()}"
        )
        assert not self.exited(), f"{self.name} exited:\n{self.rig.logs()}"

    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def control(self, *args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "trioherd", *args, "--name", self.name]
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, *command],
            capture_output=True,
            text=True,
            timeout=60,
            env=self.env,
        )

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)


class Load:
    """wrk in the client namespace, through HAProxy, until :meth:`finish`."""

    def __init__(self, rig: Rig, connections: int = CONNECTIONS, pause_ms: int = PAUSE_MS):
        self.rig = rig
        self.out = rig.open("wrk.out")
        env = dict(os.environ, RIG_PAUSE_MS=str(pause_ms))
        self.process = rig.spawn(
            rig.client,
            [str(which("wrk")), *WRK.format(connections=connections, script="load.lua").split()],
            self.out,
            env,
        )
        self.started = time.monotonic()

    def finish(self) -> LoadResult:
        """Stop wrk (SIGINT: it prints its summary) and read the summary."""
        self.process.send_signal(signal.SIGINT)
        self.process.wait(30)
        self.out.flush()
        text = (self.rig.directory / "wrk.out").read_text()
        line = [line for line in text.splitlines() if line.startswith("RIG ")]
        assert line, f"no summary from wrk:\n{text}"
        raw = json.loads(line[-1][4:])
        errors = {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
        return LoadResult(
            requests=raw["requests"],
            failed=sum(errors.values()),
            errors=errors,
            seconds=raw["duration_us"] / 1e6,
            p50_ms=raw["p50_us"] / 1000,
            p99_ms=raw["p99_us"] / 1000,
            max_ms=raw["max_us"] / 1000,
        )


class Rig:
    def __init__(self, directory: Path):
        self.id = f"thrig{os.getpid()}x{uuid.uuid4().hex[:4]}"
        self.directory = directory
        self.namespaces: list[str] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        self.files: list[IO[bytes]] = []
        self.lb, self.client = self.namespace("lb"), self.namespace("client")
        self.hosts: dict[str, Host] = {}
        self.haproxy_log = directory / "haproxy.log"

    def namespace(self, role: str) -> str:
        return f"{self.id}-{role}"

    def open(self, name: str) -> IO[bytes]:
        file = open(self.directory / name, "ab")
        self.files.append(file)
        return file

    def spawn(
        self, namespace: str, command: list[str], out: IO[bytes], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        # `ip netns exec` execs the command: the pid is the command's own
        process = subprocess.Popen(
            ["ip", "netns", "exec", namespace, *command],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=self.directory,
        )
        self.processes.append(process)
        return process

    # ---- the network

    def add_namespace(self, name: str) -> None:
        result = ip("netns", "add", name, check=False)
        if result.returncode != 0:
            pytest.skip(f"`ip netns add` does not work here: {result.stderr.strip()}")
        self.namespaces.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def build_network(self) -> None:
        self.add_namespace(self.lb)
        probe = subprocess.run(["ip", "netns", "exec", self.lb, "true"], capture_output=True)
        if probe.returncode != 0:
            pytest.skip(f"`ip netns exec` does not work here: {probe.stderr.decode().strip()}")
        ip("-n", self.lb, "link", "add", "br0", "type", "bridge")
        ip("-n", self.lb, "addr", "add", f"{LB_ADDRESS}/24", "dev", "br0")
        ip("-n", self.lb, "link", "set", "br0", "up")
        for role, address in [("client", CLIENT_ADDRESS), *HOSTS.items()]:
            namespace = self.namespace(role)
            self.add_namespace(namespace)
            port = f"v-{role}"  # the bridge port in lb; its peer is eth0 in the other one
            ip(*f"-n {self.lb} link add {port} type veth peer eth0 netns {namespace}".split())
            ip("-n", self.lb, "link", "set", port, "master", "br0", "up")
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", namespace, "link", "set", "eth0", "up")

    # ---- the processes

    def up(self) -> None:
        shutil.copy(LOAD_LUA, self.directory / "load.lua")  # wrk runs in this directory
        self.build_network()
        for name, address in HOSTS.items():
            self.hosts[name] = Host(self, name, address)
            self.hosts[name].start()
        for host in self.hosts.values():
            host.wait_ready()
        # after the herds: its log then starts with every server up
        self.spawn(
            self.lb,
            [str(which("haproxy")), "-db", "-f", str(HAPROXY_CFG)],
            self.open("haproxy.log"),
        )
        for name in self.hosts:
            self.wait_server(name, "UP")

    def down(self) -> None:
        """Stop everything and remove every namespace; called even after a failure."""
        try:
            for host in self.hosts.values():
                if not host.exited():
                    host.signal(signal.SIGTERM)  # a graceful stop, as a deployment would
            herds = {host.process for host in self.hosts.values()}
            for process in self.processes:
                if process not in herds and process.poll() is None:
                    process.kill()
            for process in self.processes:
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
        finally:
            for namespace in self.namespaces:  # and whatever still runs in them
                remove_namespace(namespace)
            for file in self.files:
                file.close()

    # ---- what HAProxy says

    def stats(self) -> dict[str, dict[str, str]]:
        """The rows of backend `herds` in HAProxy's CSV stats, by server name."""
        reply = http_get(self.lb, (LB_ADDRESS, STATS_PORT), "/stats;csv")
        rows = csv.DictReader(io.StringIO(reply.body.decode().lstrip("# ")))
        return {row["svname"]: row for row in rows if row["pxname"] == "herds"}

    def server_state(self, name: str) -> str | None:
        """UP, DOWN, "UP 1/2" (going down)...; None while HAProxy does not answer."""
        try:
            return self.stats()[name]["status"]
        except (OSError, ValueError, KeyError):
            return None

    def wait_server(self, name: str, state: str, timeout: float = 30) -> None:
        assert wait_until(lambda: self.server_state(name) == state, timeout, 0.05), (
            f"HAProxy never saw {name} {state}: {self.server_state(name)}\n{self.logs()}"
        )

    def counters(self) -> dict[str, dict[str, int]]:
        keys = ("stot", "hrsp_2xx", "hrsp_5xx", "econ", "eresp", "wretr", "wredis")
        return {
            name: {key: int(row[key] or 0) for key in keys}
            for name, row in self.stats().items()
            if name in self.hosts or name == "BACKEND"
        }

    def logs(self) -> str:
        parts = []
        for name in ["haproxy", *self.hosts]:
            path = self.directory / f"{name}.log"
            text = path.read_text(errors="replace") if path.exists() else "(none)"
            parts.append(f"==== {name}.log (last 40 lines)\n" + "\n".join(text.splitlines()[-40:]))
        return "\n".join(parts)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    reason = missing()
    if reason is not None:
        print(f"\nskipping the multi-host rig: {reason}")
        pytest.skip(reason)
    reap_stale_namespaces()
    rig = Rig(tmp_path)
    try:
        rig.up()
        yield rig
    finally:
        rig.down()


REQUEST_LINE = re.compile(  # option httplog: ... backend/server TR/Tw/Tc/Tr/Ta status ...
    r"\] \S+ (?P<server>\S+) (?P<timers>\S+) (?P<status>-?\d+) \S+ \S+ \S+ (?P<term>\S{4})"
    r" \S+/(?P<retries>\S+) \S+ \"(?P<request>[^\"]*)\""
)


def haproxy_summary(rig: Rig) -> list[str]:
    """HAProxy's log in short: every server state change (the copies haproxy -db also
    prints to stderr, "[WARNING] ...", left out), then the requests it logged
    (with `option dontlog-normal`: the failed, retried or redispatched ones), counted by
    server, status, termination state, retries (`+N`: redispatched) and whether HAProxy
    held them a second or more before a retry (its turn-around timer, Tw)."""
    states, requests = [], Counter[str]()
    for line in rig.haproxy_log.read_text().splitlines():
        if match := REQUEST_LINE.search(line):
            group = match.groupdict()
            waited = int(group["timers"].split("/")[1]) >= 1000
            key = f"{group['server']} {group['status']} {group['term']} retries={group['retries']}"
            requests[key + (" held >= 1 s before the retry" if waited else "")] += 1
        elif (" is UP" in line or " is DOWN" in line) and not line.startswith("["):
            states.append(line)
    return states + [f"{count} requests: {group}" for group, count in requests.most_common()]


def load_until(load: Load, seconds: float) -> None:
    """Keep the load on until it ran ``seconds`` in all."""
    time.sleep(max(WARM_UP, seconds - (time.monotonic() - load.started)))


def report(scenario: str, result: LoadResult, rig: Rig, before: dict[str, dict[str, int]]) -> str:
    """Print what wrk and HAProxy saw; return it for the assertion messages."""
    after = rig.counters()
    delta = {
        name: {
            key: value - before[name][key]
            for key, value in row.items()
            if value != before[name][key]
        }
        for name, row in after.items()
    }
    backend = delta.get("BACKEND", {})
    text = (
        f"rig: {scenario}: {result}; HAProxy: {backend.get('wretr', 0)} retries,"
        f" {backend.get('wredis', 0)} redispatches\n    HAProxy counters: {delta}"
    )
    print("\n" + text)
    for line in haproxy_summary(rig):
        print("    " + line)
    return text


def test_the_haproxy_configuration_in_the_docs_is_the_one_the_rig_runs() -> None:
    config = HAPROXY_CFG.read_text()
    assert f"```haproxy\n{config}```\n" in DEPLOY_MD.read_text(), (
        "docs/deploy.md must show tests/rig/haproxy.cfg verbatim in a ```haproxy block"
    )


def test_the_app_sees_the_load_generators_address_through_proxy_v2(rig: Rig) -> None:
    before = rig.counters()
    for _ in range(2 * len(HOSTS)):  # round-robin: every host answers
        reply = http_get(rig.client, (LB_ADDRESS, FRONT_PORT), "/info")
        assert reply.status == 200, reply
        info: dict[str, Any] = json.loads(reply.body)
        assert info["client"] == [CLIENT_ADDRESS, reply.local_port]
    after = rig.counters()
    assert all(after[name]["hrsp_2xx"] > before[name]["hrsp_2xx"] for name in HOSTS), after


def test_a_rolling_reload_of_every_host_fails_no_request(rig: Rig) -> None:
    before = rig.counters()
    load = Load(rig)
    time.sleep(WARM_UP)
    for host in rig.hosts.values():
        result = host.control("reload")
        assert result.returncode == 0, result.stderr
    load_until(load, LOAD_SECONDS)
    outcome = load.finish()
    text = report("rolling reload", outcome, rig, before)
    assert outcome.requests > 1000, text
    assert outcome.failed == 0, f"{text}\n{rig.logs()}"


def test_a_rolling_restart_of_every_host_fails_no_request(rig: Rig) -> None:
    before = rig.counters()
    load = Load(rig)
    time.sleep(WARM_UP)
    for name, host in rig.hosts.items():
        host.signal(signal.SIGTERM)
        assert host.wait(30) == 0, rig.logs()
        host.start()
        host.wait_ready()
        rig.wait_server(name, "UP")
    load_until(load, LOAD_SECONDS)
    outcome = load.finish()
    text = report("rolling restart", outcome, rig, before)
    assert outcome.requests > 1000, text
    assert outcome.failed == 0, f"{text}\n{rig.logs()}"


def test_sigkill_of_a_primary_fails_at_most_the_requests_in_flight_there(rig: Rig) -> None:
    victim = rig.hosts["host1"]
    others = [name for name in rig.hosts if name != "host1"]
    before = rig.counters()
    load = Load(rig)
    time.sleep(WARM_UP)
    victim.signal(signal.SIGKILL)
    victim.wait(10)
    # its workers die with it (PR_SET_PDEATHSIG): nothing of the herd is left on host1
    assert wait_until(lambda: not namespace_pids(victim.namespace), 10)
    rig.wait_server("host1", "DOWN")
    at_down, since = rig.counters(), time.monotonic()
    load_until(load, LOAD_SECONDS)
    after, served_for = rig.counters(), time.monotonic() - since
    served = {name: after[name]["hrsp_2xx"] - at_down[name]["hrsp_2xx"] for name in others}
    outcome = load.finish()
    text = report("SIGKILL of host1's primary", outcome, rig, before)
    # the requests host1 was answering when it died: HAProxy saw their connections break;
    # only those may fail, at most one per connection
    in_flight = after["host1"]["eresp"] - before["host1"]["eresp"]
    print(f"    in flight on host1: {in_flight}; then in {served_for:.1f} s: {served}")
    assert in_flight <= CONNECTIONS, text
    assert outcome.failed <= in_flight, f"{text}\n{rig.logs()}"
    for name in others:
        assert served[name] > 100 * served_for, f"{name}: {served}: {text}"
        assert not rig.hosts[name].exited()
