"""An HTTPS server on trioherd: TLS terminated in the workers.

    python examples/tls_server.py                    # throwaway CA + certificate (needs trustme)
    python examples/tls_server.py --bind 0.0.0.0:8443 --certfile cert.pem --keyfile key.pem

With no certificate given it makes a local CA and a certificate for 127.0.0.1, localhost
and ::1 in a temporary directory (removed when the server stops) and prints the curl
command that trusts that CA. Ctrl+C (or SIGTERM) stops it gracefully; SIGHUP (or
``python -m trioherd reload --name tls-example``) replaces the workers one at a time, and
each new worker reads the certificate files again.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import trio

import trioherd


async def app(request: trioherd.Request) -> trioherd.Response:
    """The app every worker runs: say how the connection is secured."""
    tls = request.tls or {}
    worker = trioherd.current_worker()
    who = f"worker {worker.id} (pid {worker.pid})" if worker else f"pid {os.getpid()}"
    client = tls.get("peer_subject") or "no client certificate"
    return trioherd.Response(
        f"Hello over {tls.get('version')} ({tls.get('cipher')}, ALPN {tls.get('alpn')}) "
        f"from {who}; {client}\n"
    )


# Workers import the app by name: as a file path, since this file is run as a script (the
# guard below keeps the workers from running the server again when they import it).
APP = f"{os.path.abspath(__file__)}:app"


def make_throwaway_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """(ca.pem, cert.pem, key.pem) of a local CA that exists only for this run."""
    import trustme  # only needed here: a real deployment brings its own certificate

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost", "::1")
    ca_pem, cert_pem, key_pem = directory / "ca.pem", directory / "cert.pem", directory / "key.pem"
    ca.cert_pem.write_to_path(ca_pem)
    cert_pem.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(key_pem)
    return ca_pem, cert_pem, key_pem


def curl_command(url: str, ca_pem: Path | None) -> str:
    scheme, _, address = url.partition("://")
    host, _, port = address.rpartition(":")
    if host in ("0.0.0.0", "[::]"):  # listening everywhere: talk to this machine
        host = "127.0.0.1"
    trust = f"--cacert {ca_pem} " if ca_pem else ""
    return f"curl {trust}{scheme}://{host}:{port}/"


async def serve(
    args: argparse.Namespace, certfile: Path, keyfile: Path | None, ca: Path | None
) -> None:
    config = trioherd.Config(
        app=APP,
        bind=[args.bind],
        workers=args.workers,
        name=args.name,
        certfile=str(certfile),
        keyfile=str(keyfile) if keyfile else None,  # None: the key is in certfile
        handle_signals=True,  # SIGINT/SIGTERM: graceful stop; SIGHUP: rolling reload
    )
    async with trio.open_nursery() as nursery:
        herd = await nursery.start(trioherd.serve, config)
        print(f"serving {', '.join(herd.addresses)} with {args.workers} workers; try:")
        for url in herd.addresses:
            print(f"  {curl_command(url, ca)}", flush=True)


def _have_trustme() -> bool:
    try:
        import trustme  # noqa: F401
    except ImportError:
        return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bind", default="127.0.0.1:8443", help="HOST:PORT (0: any free port)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--certfile", type=Path, help="certificate chain (PEM)")
    parser.add_argument("--keyfile", type=Path, help="private key (PEM)")
    parser.add_argument("--name", default="tls-example", help="herd name (control socket)")
    args = parser.parse_args()
    if args.keyfile and not args.certfile:
        parser.error("--keyfile needs --certfile")
    if not args.certfile and not _have_trustme():
        print(
            "tls_server: without --certfile/--keyfile a throwaway certificate is made with "
            "trustme: pip install trustme",
            file=sys.stderr,
        )
        raise SystemExit(2)
    try:
        if args.certfile:
            trio.run(serve, args, args.certfile, args.keyfile, None)
            return
        with tempfile.TemporaryDirectory(prefix="trioherd-tls-") as directory:
            ca_pem, cert_pem, key_pem = make_throwaway_certificate(Path(directory))
            trio.run(serve, args, cert_pem, key_pem, ca_pem)
    except* trioherd.ConfigError as group:  # e.g. "--certfile: cert.pem: no such file"
        print(f"tls_server: error: {group.exceptions[0]}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
