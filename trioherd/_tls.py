"""TLS, terminated in the workers.

The primary passes raw TCP fds and never speaks TLS; it only builds the context once at
start (:func:`check`) so that a missing file, a key that does not match its certificate or
a wrong password is an exit-2 error naming the file before any worker is spawned.
Each worker builds its own context at boot: a rolling reload therefore picks up renewed
certificate files, and connections already open keep the context they started with.

The handshake runs in the connection's own task under ``tls_handshake_timeout``: a client
that stalls or speaks garbage costs that one connection and nothing more.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

import trio

from ._config import Config
from ._errors import ConfigError

log = logging.getLogger("trioherd.tls")

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


def server_context(config: Config) -> ssl.SSLContext:
    """The worker's SSLContext, from the files in ``config`` or from the user's factory."""
    if config.ssl_context_factory:
        from ._app import load

        factory = load(config.ssl_context_factory)
        context = factory()
        if not isinstance(context, ssl.SSLContext):
            raise ConfigError("ssl_context_factory", f"returned {context!r}, not an SSLContext")
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _VERSIONS[config.tls_min_version]
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(["http/1.1"])
    assert config.certfile is not None
    try:
        context.load_cert_chain(config.certfile, config.keyfile, password=config.keyfile_password)
    except FileNotFoundError as exc:
        option = "keyfile" if config.keyfile and exc.filename == config.keyfile else "certfile"
        raise ConfigError(option, f"{exc.filename or config.certfile}: no such file") from None
    except ssl.SSLError as exc:
        raise ConfigError(*_explain(exc, config)) from None
    except OSError as exc:
        raise ConfigError("certfile", f"{config.certfile}: {exc.strerror or exc}") from None
    context.verify_mode = _VERIFY[config.client_cert]
    if config.ca_certs:
        try:
            context.load_verify_locations(cafile=config.ca_certs)
        except FileNotFoundError:
            raise ConfigError("ca_certs", f"{config.ca_certs}: no such file") from None
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError("ca_certs", f"{config.ca_certs}: {exc}") from None
    return context


def _explain(exc: ssl.SSLError, config: Config) -> tuple[str, str]:
    reason = (exc.reason or str(exc)).upper()
    keyfile = config.keyfile or config.certfile
    if "MISMATCH" in reason:
        return "keyfile", f"{keyfile} does not match the certificate in {config.certfile}"
    if "DECRYPT" in reason or "PASSWORD" in reason or "BAD_DECRYPT" in reason:
        return "keyfile_password", f"wrong password for {keyfile}"
    if "PEM" in reason or "NO_START_LINE" in reason or "KEY" in reason:
        return "keyfile", f"{keyfile}: not a usable PEM private key ({exc.reason})"
    return "certfile", f"{config.certfile}: {exc}"


def check(config: Config) -> None:
    """Build the context once in the primary to report a bad setup before spawning."""
    if config.tls and not config.ssl_context_factory:
        server_context(config)


def _subject(cert: dict[str, Any] | None) -> str | None:
    if not cert:
        return None
    parts = []
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            parts.append(f"{key}={value}")
    return ",".join(parts) or None


async def handshake(
    stream: trio.SocketStream, context: ssl.SSLContext, timeout: float
) -> tuple[trio.SSLStream[trio.SocketStream], dict[str, Any]] | None:
    """Wrap and handshake; None (connection closed) if the client fails or stalls."""
    tls_stream = trio.SSLStream(stream, context, server_side=True, https_compatible=True)
    with trio.move_on_after(timeout) as scope:
        try:
            await tls_stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.debug("TLS handshake failed: %s", exc.__cause__ or exc)
            await trio.aclose_forcefully(tls_stream)
            return None
    if scope.cancelled_caught:
        log.debug("TLS handshake timed out")
        await trio.aclose_forcefully(tls_stream)
        return None
    cipher = tls_stream.cipher()
    info = {
        "version": tls_stream.version(),
        "cipher": cipher[0] if cipher else None,
        "alpn": tls_stream.selected_alpn_protocol(),
        "peer_subject": _subject(tls_stream.getpeercert()),
    }
    return tls_stream, info
