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
from trioherd.protocols.shared import Cuts, Stats


def test_round_trip_of_every_message_type() -> None:
    samples = {
        "init": {"v": 1, "id": 3, "slot": 0, "config": {"workers": 2}},
        "disconnect": {"grace": 2.5},
        "msg": {"data": {"any": ["json", 1]}},
        "ready": {"v": 1, "pid": 42},
        "boot_error": {"text": "Traceback ..."},
        "beat": {"stats": {"requests": 5}},
        "draining": {},
        "mold": {"v": 1, "generation": 2, "config": {"workers": 2}},
        "fork": {"id": 7},
        "forked": {"pid": 42},
        "exited": {"pid": 42, "code": -9},
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
        b'{"t": "ready"}',
        b'{"t": "ready", "v": 3, "pid": "3"}',
        b'{"t": "ready", "v": 3, "pid": true}',
        b'{"t": "ack", "s": 12}',  # protocol v2's acknowledgement: the tally's now
        b'{"t": "closed", "n": 3}',  # and v2's closed report
        b'{"t": "disconnect", "grace": "soon"}',
        b'{"t": "beat", "stats": [1]}',
        b'{"t": "beat", "stats": {"requests": "5"}}',
        b'{"t": "beat", "stats": {"open": true}}',
        b'{"t": "beat", "stats": {"status": {"2xx": 1.5}}}',
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


def full_stats() -> dict[str, object]:
    stats: dict[str, object] = {key: 3 for key in _ipc.COUNTERS + _ipc.WORKER_COUNTS}
    stats[_ipc.STATUS] = {"2xx": 2, "5xx": 1}
    return stats


def test_the_stats_shape_is_what_the_counters_make() -> None:
    """Every key a worker's counters send is in the shape the primary checks and totals,
    and every key of the shape is sent (the worker adds ``open``; a live worker's
    heartbeat is compared in tests/test_operations.py)."""
    stats = Stats()
    stats.status[2] = 1
    sent = {**stats.snapshot(), "open": 0}
    assert set(sent) == {*_ipc.COUNTERS, *_ipc.WORKER_COUNTS, _ipc.STATUS, _ipc.CUTS}
    assert set(sent[_ipc.STATUS]) <= set(_ipc.STATUS_CLASSES)
    _ipc.check_stats(sent)


def test_cuts_are_counted_by_reason_and_summed_across_workers() -> None:
    first, second = Stats(), Stats()
    first.cuts.note("send_timeout", ("1.2.3.4", 5), 0.0)
    first.cuts.add("shed", 3)
    second.cuts.note("send_timeout", None, 0.0)
    for stats in (first, second):
        _ipc.check_stats(stats.snapshot())
    totals = _ipc.total_stats([first.snapshot(), second.snapshot()])
    assert totals[_ipc.CUTS] == {"send_timeout": 2, "shed": 3}
    assert set(totals[_ipc.CUTS]) <= set(_ipc.CUT_REASONS)
    with pytest.raises(IPCProtocolError):
        _ipc.check_stats({_ipc.CUTS: {"send_timeout": True}})


def test_a_crowd_of_cuts_is_logged_a_line_a_second_with_its_count() -> None:
    cuts = Cuts()
    assert cuts.note("head_timeout", ("1.2.3.4", 5), 10.0) == (
        "cut 1 connection (head_timeout: request head not received within --header-timeout"
        " (408)); last from 1.2.3.4:5"
    )
    assert [cuts.note("head_timeout", ("5.6.7.8", 9), 10.0 + n / 1000) for n in range(500)] == [
        None
    ] * 500
    assert cuts.due(10.5) == []  # not a second since the last line
    ((reason, line),) = cuts.due(11.0)
    assert reason == "head_timeout"
    assert line.startswith("cut 500 connections (head_timeout: ") and "5.6.7.8:9" in line
    assert cuts.due(12.0) == []  # nothing left to say
    assert cuts.counts == {"head_timeout": 501}


@pytest.mark.parametrize(
    "stats",
    [
        {},  # every key may be missing (a worker that has served nothing yet)
        {"requests": 5},
        full_stats(),
        {**full_stats(), "status": {}},
        {**full_stats(), "extra": "ignored", "requests": 10**30},
    ],
)
def test_check_stats_accepts_whole_numbers(stats: dict[str, object]) -> None:
    _ipc.check_stats(stats)
    assert _ipc.decode(_ipc.encode("beat", stats=stats))["stats"] == stats


@pytest.mark.parametrize("key", [*_ipc.COUNTERS, *_ipc.WORKER_COUNTS])
@pytest.mark.parametrize("bad", [True, False, 1.0, "1", None, [1], {"n": 1}])
def test_check_stats_rejects_a_counter_that_is_not_a_whole_number(key: str, bad: object) -> None:
    stats = {**full_stats(), key: bad}
    with pytest.raises(IPCProtocolError, match="malformed counters"):
        _ipc.check_stats(stats)
    with pytest.raises(IPCProtocolError, match="malformed counters"):
        _ipc.decode(_ipc.encode("beat", stats=stats))


@pytest.mark.parametrize(
    "status",
    [[1, 2], "2xx", 5, None, {"2xx": True}, {"2xx": 1.0}, {"2xx": "1"}, {"2xx": None}, {2: 1}],
)
def test_check_stats_rejects_a_bad_status_map(status: object) -> None:
    with pytest.raises(IPCProtocolError, match="malformed counters"):
        _ipc.check_stats({**full_stats(), "status": status})


@pytest.mark.parametrize("stats", [None, [], "requests", 5, True])
def test_check_stats_rejects_what_is_not_a_dict(stats: object) -> None:
    with pytest.raises(IPCProtocolError, match="malformed counters"):
        _ipc.check_stats(stats)


def test_check_stats_error_is_short() -> None:
    with pytest.raises(IPCProtocolError) as info:
        _ipc.check_stats({"requests": "x" * 10_000})
    assert len(str(info.value)) <= 200


def test_total_stats_sums_counters_and_status_classes() -> None:
    zeros = dict.fromkeys(_ipc.COUNTERS, 0)
    assert _ipc.total_stats([]) == {**zeros, "status": {}, "cuts": {}}
    first = {"requests": 2, "bytes_in": 10, "open": 4, "status": {"2xx": 2}}
    second = {"requests": 3, "bytes_out": 7, "status": {"2xx": 1, "4xx": 2}}
    totals = _ipc.total_stats([first, {}, second])
    assert totals == {
        **zeros,
        "requests": 5,
        "bytes_in": 10,
        "bytes_out": 7,
        "status": {"2xx": 3, "4xx": 2},
        "cuts": {},
    }
    # totals have the shape of stats: they can be summed again (exited workers + live ones)
    assert _ipc.total_stats([totals, second])["requests"] == 8
    assert first["status"] == {"2xx": 2}  # the inputs are left alone


def open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_fds_ride_with_their_message_and_no_fd_leaks() -> None:
    left, right = _ipc.channel_pair()
    sender, receiver = _ipc.Channel(left), _ipc.Channel(right)
    pairs = [socket.socketpair() for _ in range(_ipc.MAX_FDS)]
    before = open_fd_count()
    await sender.send(_ipc.encode_conn(1, 7), [a.fileno() for a, _ in pairs])
    ((data, fds),) = await receiver.receive_batch()
    assert _ipc.decode_conn(data) == (1, 7)
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


def test_connection_packets_carry_listener_and_sequence() -> None:
    assert _ipc.decode_conn(_ipc.encode_conn(3, 2**40)) == (3, 2**40)
    end, _ = _ipc.decode_conn(_ipc.encode_conn(_ipc.END_OF_CONNS, 0))
    assert end == _ipc.END_OF_CONNS
    for bad in (b"", b"short", b'{"t":"conn","l":0}'):
        with pytest.raises(IPCProtocolError):
            _ipc.decode_conn(bad)
