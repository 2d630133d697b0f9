"""The channel framing (sans-IO) and fd passing over a real socket pair, in process."""

from __future__ import annotations

import os
import socket

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from trioherd import _ipc
from trioherd._errors import IPCProtocolError


def test_round_trip_of_every_message_type() -> None:
    samples = {
        "init": {"v": 1, "id": 3, "slot": 0, "config": {"workers": 2}},
        "conn": {"l": 0},
        "disconnect": {"grace": 2.5},
        "msg": {"data": {"any": ["json", 1]}},
        "ready": {"v": 1, "pid": 42},
        "boot_error": {"text": "Traceback ..."},
        "beat": {"stats": {"requests": 5}},
        "closed": {"n": 7},
        "refuse": {"l": 0},
        "draining": {},
    }
    assert set(samples) == set(_ipc.SCHEMA)
    for kind, fields in samples.items():
        decoded = _ipc.decode(_ipc.encode(kind, **fields))
        assert decoded == {"t": kind, **fields}


@pytest.mark.parametrize(
    "packet",
    [
        b"",
        b"garbage",
        b"\xff\xfe",
        b"[]",
        b'"text"',
        b'{"no": "type"}',
        b'{"t": 5}',
        b'{"t": "nope"}',
        b'{"t": "closed"}',
        b'{"t": "closed", "n": "3"}',
        b'{"t": "closed", "n": true}',
        b'{"t": "disconnect", "grace": "soon"}',
        b'{"t": "beat", "stats": [1]}',
    ],
)
def test_malformed_packets_are_protocol_errors(packet: bytes) -> None:
    with pytest.raises(IPCProtocolError):
        _ipc.decode(packet)


@given(st.binary(max_size=200))
def test_decode_never_fails_otherwise(packet: bytes) -> None:
    try:
        message = _ipc.decode(packet)
    except IPCProtocolError:
        return
    assert message["t"] in _ipc.SCHEMA


@given(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=4))
def test_decode_of_random_objects(obj: dict[str, object]) -> None:
    import json

    try:
        _ipc.decode(json.dumps(obj).encode())
    except IPCProtocolError:
        pass


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_fds_ride_with_their_message_and_no_fd_leaks() -> None:
    left, right = _ipc.channel_pair()
    sender, receiver = _ipc.Channel(left), _ipc.Channel(right)
    pairs = [socket.socketpair() for _ in range(_ipc.MAX_FDS)]
    before = open_fd_count()
    await sender.send(_ipc.encode("conn", l=0), [a.fileno() for a, _ in pairs])
    ((data, fds),) = await receiver.receive_batch()
    assert _ipc.decode(data) == {"t": "conn", "l": 0}
    assert len(fds) == _ipc.MAX_FDS
    # each received fd is the same connection: what goes in one end comes out the other
    for (a, b), fd in zip(pairs, fds, strict=True):
        with socket.socket(fileno=fd) as received:
            received.sendall(b"x")
            assert b.recv(1) == b"x"
        a.close()
        b.close()
    assert open_fd_count() <= before
    sender.close()
    with pytest.raises(_ipc.ChannelClosed):
        await receiver.receive_batch()
    receiver.close()


async def test_too_many_fds_are_closed_and_reported() -> None:
    left, right = _ipc.channel_pair()
    receiver = _ipc.Channel(right)
    pairs = [socket.socketpair() for _ in range(_ipc.MAX_FDS + 4)]
    before = open_fd_count()
    left.sendmsg(
        [b'{"t":"conn","l":0}'],
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(_fd_array([a.fileno() for a, _ in pairs])))],
    )
    with trio.fail_after(5):
        await trio.lowlevel.wait_readable(right)
    with pytest.raises(IPCProtocolError):
        receiver.receive_nowait()
    assert open_fd_count() <= before  # the truncated batch was closed, not leaked
    for a, b in pairs:
        a.close()
        b.close()
    left.close()
    receiver.close()


def _fd_array(fds: list[int]) -> object:
    import array

    return array.array("i", fds)
