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

import contextlib
import logging
import ssl
from typing import Any

import trio

from ._config import Config
from ._errors import ConfigError

log = logging.getLogger("trioherd.tls")

ALERT_TIMEOUT = 1.0

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {
    "none": ssl.CERT_NONE,
    "optional": ssl.CERT_OPTIONAL,
    "required": ssl.CERT_REQUIRED,
}


def server_context(config: Config) -> ssl.SSLContext:
    """The worker's SSLContext, from the files in ``config`` or from the user's factory.

    Raises ConfigError naming the option and the file: a file that is missing or cannot be
    read, a certificate file without a certificate, a key that is not a key or does not
    match the certificate, an encrypted key without its password or with a wrong one.
    """
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
    _load_cert_chain(context, config)
    context.verify_mode = _VERIFY[config.client_cert]
    if config.ca_certs:
        _check_readable("ca_certs", config.ca_certs)
        try:
            context.load_verify_locations(cafile=config.ca_certs)
        except (ssl.SSLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise ConfigError(
                "ca_certs", f"{config.ca_certs}: no usable PEM certificate ({reason})"
            ) from None
    return context


class _NoPassword(Exception):
    """OpenSSL asked for the password of an encrypted key and none was configured."""


def _load_cert_chain(context: ssl.SSLContext, config: Config) -> None:
    # OpenSSL's errors here say little more than "PEM lib" and never name the file, so the
    # files are checked one step at a time to say which option is wrong. The password is
    # always given as a callable: without one, OpenSSL would prompt on the terminal for the
    # password of an encrypted key (and block a server started from a shell).
    assert config.certfile is not None
    certfile = config.certfile
    keyfile = config.keyfile or certfile
    _check_readable("certfile", certfile)
    if config.keyfile:
        _check_readable("keyfile", config.keyfile)
    asked = False

    def password() -> str:
        nonlocal asked
        asked = True
        if config.keyfile_password is None:
            raise _NoPassword
        return config.keyfile_password

    try:
        context.load_cert_chain(certfile, config.keyfile, password=password)
    except _NoPassword:
        raise ConfigError(
            "keyfile_password", f"{keyfile} is encrypted: give its password"
        ) from None
    except ssl.SSLError as exc:
        raise ConfigError(*_explain(exc, config, asked)) from None
    except OSError as exc:
        raise ConfigError("certfile", f"{certfile}: {exc.strerror or exc}") from None


def _check_readable(option: str, path: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except FileNotFoundError:
        raise ConfigError(option, f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(option, f"{path}: {exc.strerror or exc}") from None


def _explain(exc: ssl.SSLError, config: Config, password_asked: bool) -> tuple[str, str]:
    """(option, message) for a failed load_cert_chain."""
    certfile = config.certfile
    keyfile = config.keyfile or certfile
    if "MISMATCH" in f"{exc.reason} {exc}".upper():
        return "keyfile", f"{keyfile} does not match the certificate in {certfile}"
    if password_asked:
        return "keyfile_password", f"wrong password for {keyfile}"
    try:  # is the certificate the problem? (the key is read after it)
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=certfile)
    except (ssl.SSLError, OSError):
        return "certfile", f"{certfile}: no usable PEM certificate"
    if config.keyfile is None:
        return "keyfile", f"{certfile} holds no usable PEM private key: give --keyfile"
    return "keyfile", f"{keyfile}: no usable PEM private key"


def check(config: Config) -> None:
    """Build the context once in the primary to report a bad setup before spawning."""
    if config.tls and not config.ssl_context_factory:
        server_context(config)


# RFC 4514 short names of the attribute types Python's getpeercert() spells out in full.
_SHORT_NAMES = {
    "commonName": "CN",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
    "countryName": "C",
    "streetAddress": "STREET",
    "domainComponent": "DC",
    "userId": "UID",
}


def _escape(value: str) -> str:
    escaped = "".join("\\" + char if char in '\\,+"<>;' else char for char in value)
    if escaped.startswith(("#", " ")):
        escaped = "\\" + escaped
    if escaped.endswith(" ") and not escaped.endswith("\\ "):
        escaped = escaped[:-1] + "\\ "
    return escaped


def _subject(cert: dict[str, Any] | None) -> str | None:
    """The peer certificate's subject as an RFC 4514 string (``CN=alice,O=Example``: most
    specific first), as the ASGI TLS extension's ``client_cert_name`` wants it."""
    if not cert:
        return None
    rdns = [
        "+".join(f"{_SHORT_NAMES.get(key, key)}={_escape(value)}" for key, value in rdn)
        for rdn in cert.get("subject", ())
    ]
    return ",".join(reversed(rdns)) or None


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
            await _send_alert(tls_stream)
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


async def _send_alert(tls_stream: trio.SSLStream[trio.SocketStream]) -> None:
    """Send the alert OpenSSL queued when the handshake failed.

    trio's SSLStream turns the SSLError into BrokenResourceError without sending what is
    left in its outgoing buffer (trio 0.35), and that is the alert which tells the client
    why: protocol version, certificate required, unknown CA. Without it the client sees a
    bare EOF or a reset. The buffer is private to trio, so this looks for it carefully and
    does nothing if it is gone; the send is bounded by ALERT_TIMEOUT.
    """
    outgoing = getattr(tls_stream, "_outgoing", None)
    if not isinstance(outgoing, ssl.MemoryBIO) or not outgoing.pending:
        return
    with (
        trio.move_on_after(ALERT_TIMEOUT),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
    ):
        await tls_stream.transport_stream.send_all(outgoing.read())
