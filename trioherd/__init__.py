"""trioherd: a Trio process herd.

One primary process supervises worker processes, accepts connections and hands each one to
a worker by fd passing (SCM_RIGHTS); the workers serve HTTP/1.1 with h11, optionally over
TLS. See docs/architecture.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._config import Config as Config
from ._errors import ConfigError as ConfigError
from ._errors import IPCProtocolError as IPCProtocolError
from ._errors import ReloadError as ReloadError
from ._errors import StoppedBeforeReady as StoppedBeforeReady
from ._errors import TrioherdError as TrioherdError
from ._errors import WorkerBootError as WorkerBootError
from .apps.loading import Headers as Headers
from .apps.loading import Request as Request
from .apps.loading import Response as Response
from .apps.loading import stream_handler as stream_handler
from .worker.base import WorkerInfo as WorkerInfo
from .worker.base import current_worker as current_worker
from .worker.main import receive_from_primary as receive_from_primary
from .worker.main import send_to_primary as send_to_primary

if TYPE_CHECKING:
    from ._cli import run as run
    from ._serve import serve as serve
    from .primary.events import HerdEvent as HerdEvent
    from .primary.herd import Herd as Herd
    from .primary.process import WorkerProcess as WorkerProcess
    from .primary.process import WorkerState as WorkerState
    from .protocols.websocket import WebSocket as WebSocket
    from .protocols.websocket import WebSocketClosed as WebSocketClosed

# The primary's side is imported on first use: a worker process never needs it, and every
# module a worker does not import is memory each of N workers does not spend.
_LAZY = {
    "run": "_cli",
    "Herd": "primary.herd",
    "HerdEvent": "primary.events",
    "WorkerProcess": "primary.process",
    "WorkerState": "primary.process",
    "serve": "_serve",
    "WebSocket": "protocols.websocket",  # wsproto is loaded by a worker's first WebSocket
    "WebSocketClosed": "protocols.websocket",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'trioherd' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"trioherd.{module_name}"), name)
    globals()[name] = value
    return value


__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "Headers",
    "Herd",
    "HerdEvent",
    "IPCProtocolError",
    "ReloadError",
    "Request",
    "Response",
    "StoppedBeforeReady",
    "TrioherdError",
    "WebSocket",
    "WebSocketClosed",
    "WorkerBootError",
    "WorkerInfo",
    "WorkerProcess",
    "WorkerState",
    "current_worker",
    "receive_from_primary",
    "run",
    "send_to_primary",
    "serve",
    "stream_handler",
]
