"""TLS, terminated in the workers.

The primary passes raw TCP fds and never speaks TLS; it only builds the context once at
start (:func:`check`) so that a missing file, a key that does not match its certificate or
a wrong password is an exit-2 error naming the file before any worker is spawned.
Each worker builds its own context at boot: a rolling reload therefore picks up renewed
certificate files, and connections already open keep the context they started with.

The handshake runs in the connection's own task under ``tls_handshake_timeout``: a client
that stalls or speaks garbage costs that one connection and nothing more. HTTP connections
are secured by :func:`secure` (``protocols.tlsstream``: OpenSSL's records on memory BIOs
over the worker's raw socket); stream handlers, which get a full trio stream, by
:func:`handshake` (trio's SSLStream).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import secrets
import socket
import ssl
import sys
from typing import TYPE_CHECKING, Any

import trio

from ._config import Config
from ._errors import ConfigError
from .protocols.tlslink import HandshakeWatch
from .protocols.tlsstream import TLSSocketStream

if TYPE_CHECKING:
    from .protocols.state import ServerState

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
        from .apps.loading import load

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


# -- session tickets shared by the herd --------------------------------------------------
#
# Each SSL_CTX starts with random session-ticket keys of its own, so a ticket one worker
# issued means nothing to the next worker the dispatcher picks: every reconnecting client
# paid a full handshake. The primary makes one set of keys per herd (new_ticket_keys) and
# sends it in every worker's init message; the worker installs it in its context
# (share_ticket_keys). Python's ssl module has no API for this, so it goes through ctypes:
# OpenSSL's SSL_CTX_ctrl(SSL_CTRL_SET_TLSEXT_TICKET_KEYS) on the SSL_CTX that CPython keeps
# right after the object header of an SSLContext (Modules/_ssl.c: PySSLContext). Anything
# unexpected leaves the context as it was, with one warning: never a failed boot.

TICKET_KEYS_SIZE = 80
"""A 16-byte key name, a 32-byte HMAC secret and a 32-byte AES key (OpenSSL 1.1 and 3)."""
_GET_TICKET_KEYS = 58  # SSL_CTRL_GET_TLSEXT_TICKET_KEYS in ssl.h
_SET_TICKET_KEYS = 59  # SSL_CTRL_SET_TLSEXT_TICKET_KEYS


def new_ticket_keys() -> bytes:
    """The session-ticket keys of one herd: made once by the primary, kept for its life."""
    return secrets.token_bytes(TICKET_KEYS_SIZE)


def share_ticket_keys(context: ssl.SSLContext, keys: object) -> bool:
    """Seal and open the session tickets of ``context`` with the herd's ``keys`` (their hex
    string, from the init message), so that a returning client resumes on any worker.

    True once they are installed. Never raises: without keys (plain HTTP) it does nothing;
    with keys it cannot install (malformed, or a Python or OpenSSL this does not know) it
    logs one warning and leaves the context its own keys, so that a client resumes only on
    the worker that issued its ticket.
    """
    if not keys:
        return False
    try:
        if not isinstance(keys, str):
            raise TypeError(f"keys are a {type(keys).__name__}, not a hex string")
        problem = _install_ticket_keys(context, bytes.fromhex(keys))
    except Exception as exc:
        problem = f"{type(exc).__name__}: {exc}"
    if problem:
        log.warning(
            "TLS session tickets stay per worker (a client resumes only on the worker "
            "that issued its ticket): %s",
            problem,
        )
        return False
    log.debug("TLS session-ticket keys of the herd installed")
    return True


def _install_ticket_keys(context: ssl.SSLContext, keys: bytes) -> str | None:
    """Set the ticket keys of the SSL_CTX behind ``context``; None, or what stopped it."""
    if len(keys) != TICKET_KEYS_SIZE:
        return f"{len(keys)} bytes of keys, not {TICKET_KEYS_SIZE}"
    if sys.implementation.name != "cpython" or not isinstance(context, ssl.SSLContext):
        return "not a CPython ssl.SSLContext"
    lib = _libssl()
    if isinstance(lib, str):
        return lib
    # struct PySSLContext { PyObject_HEAD; SSL_CTX *ctx; ... }: the pointer is checked by
    # asking OpenSSL for the context's options, which must be what Python reports
    ctx = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not ctx or lib.SSL_CTX_get_options(ctx) != int(context.options):
        return "the SSL_CTX of the SSLContext is not where CPython keeps it"
    size = lib.SSL_CTX_ctrl(ctx, _SET_TICKET_KEYS, 0, None)  # no buffer: asks the size
    if size != TICKET_KEYS_SIZE:
        return f"OpenSSL wants {size} bytes of ticket keys, not {TICKET_KEYS_SIZE}"
    written = ctypes.create_string_buffer(keys, TICKET_KEYS_SIZE)
    read_back = ctypes.create_string_buffer(TICKET_KEYS_SIZE)
    try:
        if (
            lib.SSL_CTX_ctrl(ctx, _SET_TICKET_KEYS, TICKET_KEYS_SIZE, written) != 1
            or lib.SSL_CTX_ctrl(ctx, _GET_TICKET_KEYS, TICKET_KEYS_SIZE, read_back) != 1
            or read_back.raw != keys
        ):
            lib.ERR_clear_error()  # leave nothing in the queue for the next ssl call
            return "OpenSSL refused the ticket keys"
    finally:
        ctypes.memset(written, 0, TICKET_KEYS_SIZE)
        ctypes.memset(read_back, 0, TICKET_KEYS_SIZE)
    return None


_libssl_cache: list[ctypes.CDLL | str] = []


def _libssl() -> ctypes.CDLL | str:
    """The OpenSSL that Python's ``_ssl`` module is linked with, its functions typed; or,
    as a string, why it cannot be used."""
    if not _libssl_cache:
        _libssl_cache.append(_load_libssl())
    return _libssl_cache[0]


def _load_libssl() -> ctypes.CDLL | str:
    path = getattr(sys.modules.get("_ssl"), "__file__", None)
    try:
        lib = ctypes.CDLL(path)  # dlsym on _ssl's handle also searches its libssl, libcrypto
        lib.OpenSSL_version_num.restype = ctypes.c_ulong
        lib.OpenSSL_version_num.argtypes = []
        version = int(lib.OpenSSL_version_num())
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        # uint64_t in OpenSSL 3, unsigned long in 1.1
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64 if version >> 28 else ctypes.c_ulong
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.ERR_clear_error.restype = None
        lib.ERR_clear_error.argtypes = []
    except (OSError, AttributeError) as exc:
        return f"OpenSSL's functions are not reachable from Python's _ssl ({exc})"
    if version != ssl.OPENSSL_VERSION_NUMBER:
        return f"OpenSSL {version:#x} found, but Python's ssl uses {ssl.OPENSSL_VERSION}"
    if version >> 28 != 3 and version >> 20 != 0x101:
        return f"{ssl.OPENSSL_VERSION} is not OpenSSL 1.1 or 3"
    return lib


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


def facts(tls: Any) -> dict[str, Any]:
    """What the app learns of a connection's TLS (``request.tls``, the ASGI extension),
    from an SSLObject or a stream that forwards its methods (trio's SSLStream)."""
    cipher = tls.cipher()
    return {
        "version": tls.version(),
        "cipher": cipher[0] if cipher else None,
        "alpn": tls.selected_alpn_protocol(),
        "peer_subject": _subject(tls.getpeercert()),
    }


async def secure(
    sock: socket.socket, context: ssl.SSLContext, state: ServerState
) -> tuple[TLSSocketStream, dict[str, Any]] | None:
    """The handshake of an HTTP connection on its accepted socket, within the
    handshake timeout (enforced by the worker's sweeper): its TLS stream and
    :func:`facts`, or None (the socket closed) if the client fails, goes or stalls. A
    client that OpenSSL refuses gets the alert that says why, within ALERT_TIMEOUT."""
    stream = TLSSocketStream(sock, context, state.edge)
    watch = HandshakeWatch(stream, state.now() + state.config.tls_handshake_timeout)
    state.connections.add(watch)
    try:
        await stream.do_handshake()
    except ssl.SSLError as exc:
        log.debug("TLS handshake failed: %s", exc)
        with (
            trio.move_on_after(ALERT_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            await stream.send_alert()
        stream.close()
        return None
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        if watch.expired is not None:
            log.debug("TLS handshake timed out")
        else:
            log.debug("TLS handshake failed: %s", exc.__cause__ or exc)
        stream.close()
        return None
    finally:
        state.connections.discard(watch)
    return stream, facts(stream.ssl_object)


async def handshake(
    stream: trio.SocketStream, context: ssl.SSLContext, timeout: float
) -> tuple[trio.SSLStream[trio.SocketStream], dict[str, Any]] | None:
    """Wrap in trio's SSLStream and handshake (for stream handlers); None (connection
    closed) if the client fails or stalls."""
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
    return tls_stream, facts(tls_stream)


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
