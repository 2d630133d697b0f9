"""Apps: the native Request/Response types, loading an app by import string, and telling
the interfaces apart.

- native: ``async def app(request: Request) -> Response``
- ASGI 3: ``async def app(scope, receive, send)``
- WSGI (PEP 3333): ``def app(environ, start_response)``, run in threads (``apps.wsgi``)
- stream: ``async def handle(stream: trio.abc.Stream)``, for protocols other than HTTP

Detection (``--interface auto``): a function marked with :func:`stream_handler` or whose one
parameter is annotated with a trio stream type is a stream handler; three parameters make an
ASGI app; a plain (not async) callable that takes two arguments is a WSGI app (a function,
an object whose ``__call__`` is one: Flask, Django's ``get_wsgi_application()``, or a
wrapper taking ``*args``); one parameter makes a native app.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import attrs

from .._errors import ConfigError

if TYPE_CHECKING:
    from ..protocols.websocket import WebSocket

F = TypeVar("F", bound=Callable[..., Any])


def stream_handler(handler: F) -> F:
    """Mark ``async def handle(stream)`` as a raw stream handler (no HTTP)."""
    handler.__trioherd_interface__ = "stream"  # type: ignore[attr-defined]
    return handler


class Headers:
    """Request headers: case-insensitive lookup over the raw (name, value) pairs."""

    __slots__ = ("raw",)

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw  # names are lower-case, as h11 gives them

    def get(self, name: str, default: str | None = None) -> str | None:
        key = name.lower().encode("latin-1")
        for raw_name, value in self.raw:
            if raw_name == key:
                return value.decode("latin-1")
        return default

    def get_all(self, name: str) -> list[str]:
        key = name.lower().encode("latin-1")
        return [value.decode("latin-1") for raw_name, value in self.raw if raw_name == key]

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.get(name) is not None

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for name, value in self.raw:
            yield name.decode("latin-1"), value.decode("latin-1")

    def __len__(self) -> int:
        return len(self.raw)

    def __repr__(self) -> str:
        return f"Headers({list(self)!r})"


@attrs.define(eq=False)
class Request:
    """One HTTP request, as a native app sees it."""

    method: str
    path: str
    query: str
    headers: Headers
    client: tuple[str, int] | None
    http_version: str
    scheme: str = "http"
    tls: dict[str, Any] | None = None
    """TLS facts when served over HTTPS: ``version``, ``cipher``, ``alpn`` and
    ``peer_subject`` (the client certificate's subject, when one was given)."""
    _reader: AsyncIterable[bytes] | None = attrs.field(default=None, repr=False)
    _upgrade: Any = attrs.field(default=None, repr=False)  # protocols.websocket.Upgrade

    @property
    def websocket(self) -> bool:
        """The request asks for a WebSocket (and ``--ws`` is not ``none``): accept it with
        :meth:`accept_websocket`, or refuse it by returning a Response (403, ...)."""
        return self._upgrade is not None

    @property
    def websocket_subprotocols(self) -> list[str]:
        """The subprotocols the client offers (``Sec-WebSocket-Protocol``), in its order."""
        return [] if self._upgrade is None else list(self._upgrade.subprotocols)

    async def accept_websocket(
        self,
        subprotocol: str | None = None,
        headers: dict[str, str] | list[tuple[str, str]] | None = None,
    ) -> WebSocket:
        """Answer the handshake (101 Switching Protocols) and return the open WebSocket;
        ``subprotocol`` must be one the client offered, ``headers`` go into the 101."""
        if self._upgrade is None:
            raise RuntimeError("not a WebSocket request (see Request.websocket)")
        items = headers.items() if isinstance(headers, dict) else headers or ()
        fields = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in items]
        websocket: WebSocket = await self._upgrade.accept(subprotocol, fields)
        return websocket

    async def body(self) -> bytes:
        """The whole body (bounded by ``max_body_size``)."""
        return b"".join([chunk async for chunk in self.stream()])

    async def stream(self) -> AsyncIterator[bytes]:
        """The body, chunk by chunk, as it arrives."""
        if self._reader is None:
            return
        async for chunk in self._reader:
            yield chunk


Body = bytes | str | AsyncIterable[bytes]


@attrs.define(eq=False)
class Response:
    """What a native app returns. ``body`` may be bytes, str (sent as UTF-8) or an async
    iterator of bytes (streamed with chunked encoding, flushed as produced)."""

    body: Body = b""
    status: int = 200
    headers: dict[str, str] | list[tuple[str, str]] = attrs.Factory(dict)
    content_type: str | None = None


def load(spec: str) -> Any:
    """Import ``module:attr`` or ``/path/to/file.py:attr`` (``attr`` may be dotted and
    defaults to ``app``). Exceptions from the import propagate with the app's own message."""
    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name:
        raise ImportError(f"app {spec!r}: expected 'module:attr'")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        name = "__trioherd_app__"
        module = sys.modules.get(name)  # a worker forked by a mold: the mold's import
        if module is None or getattr(module, "__file__", None) != path:
            module = _load_file(spec, name, path)
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(
                f"app {spec!r}: module {module_name!r} has no attribute {attr!r}"
            ) from None
    if not callable(obj):
        raise TypeError(f"app {spec!r} is not callable: {obj!r}")
    return obj


def _load_file(spec: str, name: str, path: str) -> Any:
    """Import the file ``path`` as the module ``name``."""
    file_spec = importlib.util.spec_from_file_location(name, path)
    if file_spec is None or file_spec.loader is None:
        raise ImportError(f"app {spec!r}: cannot load {path}")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[name] = module
    sys.path.insert(0, os.path.dirname(path))
    file_spec.loader.exec_module(module)
    return module


def _is_async(app: Any) -> bool:
    """``app`` is (or whose ``__call__`` is) an async function, or a plain one that says
    it returns an awaitable."""
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else app.__call__
    if inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call):
        return True
    returns = str(getattr(call, "__annotations__", {}).get("return", ""))
    return "Awaitable" in returns or "Coroutine" in returns


def _positional(app: Any) -> list[inspect.Parameter] | None:
    """The positional parameters without a default the app takes (the function's, or
    its ``__call__``'s); None if its signature cannot be read."""
    target = app if inspect.isfunction(app) or inspect.ismethod(app) else app.__call__
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    return [
        p
        for p in signature.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]


def _takes_two(app: Any) -> bool:
    """``app(environ, start_response)`` is a call its signature allows (two parameters,
    or ``*args``: a wrapper such as wsgiref's validator)."""
    target = app if inspect.isfunction(app) or inspect.ismethod(app) else app.__call__
    try:
        inspect.signature(target).bind(None, None)
    except (TypeError, ValueError):
        return False
    return True


def refuse_sync(app: Any, wsgi: bool = True) -> None:
    """Raise ConfigError for a plain ``def`` function (or method) given as the app, unless
    it is a WSGI app (two parameters) and ``wsgi`` allows one: the other interfaces call
    the app and await what it returns, so it would fail every request. An object whose
    ``__call__`` is a plain method returning a coroutine (Quart's app) is accepted: only
    a call tells what it returns."""
    if not (inspect.isfunction(app) or inspect.ismethod(app)) or _is_async(app):
        return
    if wsgi and _takes_two(app):
        return  # def app(environ, start_response): WSGI
    name = f"{getattr(app, '__module__', '?')}:{getattr(app, '__qualname__', app)}"
    raise ConfigError(
        "app",
        f"{name} is a plain function (def), not async def; trioherd serves "
        "async def app(request) (native), async def app(scope, receive, send) (ASGI 3) "
        "or def app(environ, start_response) (WSGI)",
    )


def detect_interface(app: Any, configured: str = "auto") -> str:
    """The app's interface (see the module's docstring); a plain ``def`` function that is
    not a WSGI app is refused with ConfigError, and so is an async one named WSGI."""
    if configured == "wsgi":
        if _is_async(app):
            raise ConfigError("interface", "wsgi: the app is async def, not a WSGI app")
        return configured
    refuse_sync(app, wsgi=configured == "auto")
    if configured != "auto":
        return configured
    marked = getattr(app, "__trioherd_interface__", None)
    if isinstance(marked, str):
        return marked
    params = _positional(app)
    if params is None:
        return "native"
    if len(params) == 3:
        return "asgi"
    if not _is_async(app) and _takes_two(app):
        return "wsgi"
    if len(params) == 1:
        annotation = params[0].annotation
        text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
        if "Stream" in str(text):
            return "stream"
    return "native"
