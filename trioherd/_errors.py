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
