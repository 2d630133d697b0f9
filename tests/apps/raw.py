"""Raw stream handlers for the herd tests (no HTTP)."""

from __future__ import annotations

import os

import trio

import trioherd
from trioherd.worker import main as _worker


@trioherd.stream_handler
async def whoami(stream: trio.abc.Stream) -> None:
    """Send this worker's pid and close."""
    await stream.send_all(f"{os.getpid()}\n".encode())


@trioherd.stream_handler
async def echo(stream: trio.abc.Stream) -> None:
    """Say the pid, then echo every chunk back until the client closes."""
    await stream.send_all(f"{os.getpid()}\n".encode())
    async for chunk in stream:
        await stream.send_all(chunk)


@trioherd.stream_handler
async def slow_reply(stream: trio.abc.Stream) -> None:
    """Read one chunk, take a second, answer, close: an exchange a stop must not cut."""
    await stream.send_all(f"{os.getpid()}\n".encode())
    data = await stream.receive_some(1024)
    await trio.sleep(1.0)
    await stream.send_all(b"done:" + data)


@trioherd.stream_handler
async def never_finish(stream: trio.abc.Stream) -> None:
    await stream.send_all(f"{os.getpid()}\n".encode())
    await trio.sleep_forever()


@trioherd.stream_handler
async def inject(stream: trio.abc.Stream) -> None:
    """Write the bytes the client sends (hex) as one raw packet on the worker's channel to
    the primary: how the IPC fuzz test speaks for a misbehaving worker."""
    await stream.send_all(f"{os.getpid()}\n".encode())
    line = await stream.receive_some(65536)
    worker = _worker._current
    assert worker is not None
    worker.channel.sock.send(bytes.fromhex(line.decode().strip()))
    await stream.send_all(b"sent\n")


@trioherd.stream_handler
async def tally(stream: trio.abc.Stream) -> None:
    """Report to the primary, then answer with the pid."""
    await trioherd.send_to_primary({"pid": os.getpid(), "hello": True})
    await stream.send_all(f"{os.getpid()}\n".encode())


@trioherd.stream_handler
async def hold_pid(stream: trio.abc.Stream) -> None:
    """Send the pid, then hold the connection until the client closes it."""
    await stream.send_all(f"{os.getpid()}\n".encode())
    async for _ in stream:
        pass
