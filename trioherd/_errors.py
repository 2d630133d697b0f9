"""The few exceptions trioherd raises."""

from __future__ import annotations


class TrioherdError(Exception):
    """Base class of trioherd's own errors."""


class ConfigError(TrioherdError):
    """A bad option value. ``option`` names it as a user spells it on the command line."""

    def __init__(self, option: str, message: str) -> None:
        self.option = option
        self.message = message
        super().__init__(f"--{option.replace('_', '-')}: {message}")


class WorkerBootError(TrioherdError):
    """Workers kept dying before they became ready; ``text`` is the worker's own error."""

    def __init__(self, text: str) -> None:
        self.text = text
        super().__init__(text)


class IPCProtocolError(TrioherdError):
    """A malformed message on a primary/worker channel."""


class StoppedBeforeReady(TrioherdError):
    """A stop (a signal, ``herd.stop()``) came while the herd was still booting.
    ``forced``: it was a stop at once (a second signal)."""

    forced = False


class ReloadError(TrioherdError):
    """A replacement worker failed to boot; the reload stopped and old workers still serve."""
