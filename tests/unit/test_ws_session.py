"""The WebSocket session core (``protocols.ws_session``), without I/O: frames in, messages
and frames out, the close handshake, size limits, deadlines from a given ``now``. A
client's frames come from wsproto's own frame protocol (client side, masked)."""

from __future__ import annotations

import struct
import zlib

import pytest
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol

from trioherd.protocols.ws_incoming import INFLATE_PIECE
from trioherd.protocols.ws_inflate import BoundedDeflate
from trioherd.protocols.ws_session import (
    CLOSED,
    LOCAL_CLOSING,
    OPEN,
    REMOTE_CLOSING,
    Session,
    Step,
    data_frame,
)


class Counters:
    ws_in = 0


def client(deflate: bool = False, offer: str = "permessage-deflate") -> FrameProtocol:
    if not deflate:
        return FrameProtocol(client=True, extensions=[])
    extension = PerMessageDeflate()
    extension.finalize(offer)
    return FrameProtocol(client=True, extensions=[extension])


def session(
    deflate: bool = False, max_size: int = 1 << 20, offer: str = "permessage-deflate", **kw: float
) -> Session:
    extensions = []
    if deflate:
        extension = BoundedDeflate()
        assert extension.accept(offer) is not None
        extensions.append(extension)
    return Session(extensions, max_size, Counters(), **kw)  # type: ignore[arg-type]


def steps(core: Session, limit: int = 10_000) -> list[Step]:
    """Step until the session needs more input (IDLE) or holds a close (HELD)."""
    seen = []
    for _ in range(limit):
        step = core.step()
        seen.append(step)
        if step in (Step.IDLE, Step.HELD, Step.CLOSED):
            return seen
    raise AssertionError(f"no end after {limit} steps")


def close_frame_of(data: bytes) -> tuple[int, bytes]:
    """The code and reason of the close frame among the server frames in ``data``."""
    while data:
        length, start = data[1] & 0x7F, 2
        if length >= 126:
            start += 2 if length == 126 else 8
            length = int.from_bytes(data[2:start], "big")
        if data[0] & 0x0F == 0x8:
            payload = data[start : start + length]
            return struct.unpack("!H", payload[:2])[0], payload[2:]
        data = data[start + length :]
    raise AssertionError("no close frame")


# -- messages -------------------------------------------------------------------------------


def test_messages_are_assembled_from_fragments_and_counted() -> None:
    peer, core = client(), session()
    data = bytes(peer.send_data("hel", fin=False)) + bytes(peer.send_data("lo"))
    data += bytes(peer.send_data(b"\x00\x01"))
    assert core.receive_data(data)
    assert steps(core) == [Step.IDLE]
    assert list(core.inbox) == ["hello", b"\x00\x01"]
    assert core.counters.ws_in == 2


def test_frames_that_came_with_the_handshake_are_read_first() -> None:
    peer = client()
    core = session(early=bytes(peer.send_data("early")))
    assert core.unread
    assert steps(core) == [Step.IDLE]
    assert list(core.inbox) == ["early"]
    assert not core.unread


def test_a_ping_is_answered_in_order_and_only_while_open() -> None:
    peer, core = client(), session()
    assert core.send_message("first")
    core.receive_data(bytes(peer.ping(b"are you there")))
    assert steps(core) == [Step.IDLE]
    assert core.take_outgoing() == data_frame("first") + b"\x8a\x0dare you there"
    assert core.take_outgoing() == b""
    assert core.close(1000, "")
    assert core.take_outgoing() == b"\x88\x02\x03\xe8"
    core.receive_data(bytes(peer.ping(b"late")))
    steps(core)
    assert core.take_outgoing() == b""  # no pong after our close


def test_a_message_over_the_limit_is_held_as_a_1009_failure() -> None:
    peer, core = client(), session(max_size=10)
    core.receive_data(bytes(peer.send_data("x" * 6, fin=False)) + bytes(peer.send_data("x" * 5)))
    assert steps(core) == [Step.HELD]
    assert core.pending == (1009, "message too big") and core.failure == "limit"
    assert core.settle()
    assert core.failed and core.state is LOCAL_CLOSING and core.close_code == 1009
    assert close_frame_of(core.take_outgoing()) == (1009, b"message too big")
    assert not core.receive_data(bytes(peer.send_data("more")))  # dropped from now on


def test_text_is_measured_in_utf8_bytes() -> None:
    peer, core = client(), session(max_size=1000)
    core.receive_data(bytes(peer.send_data("é" * 500)))
    assert steps(core) == [Step.IDLE]
    core.receive_data(bytes(peer.send_data("é" * 501)))
    assert steps(core) == [Step.HELD]


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\x81\x03abc", 1002),  # unmasked
        (b"\x81\x82\x00\x00\x00\x00\xff\xfe", 1007),  # not UTF-8
        (b"\x83\x80\x00\x00\x00\x00", 1002),  # a reserved opcode
    ],
)
def test_a_protocol_error_is_held_and_fails_the_connection(frame: bytes, code: int) -> None:
    core = session()
    core.receive_data(frame)
    assert steps(core) == [Step.HELD]
    assert core.pending is not None and core.pending[0] == code
    assert core.failure == "protocol_error"
    assert core.settle() and core.failed
    assert close_frame_of(core.take_outgoing())[0] == code


# -- the close handshake ----------------------------------------------------------------------


def test_the_clients_close_waits_for_the_apps_answers_then_is_echoed() -> None:
    peer, core = client(), session()
    core.receive_data(bytes(peer.send_data("question")) + bytes(peer.close(4000, "bye")))
    assert steps(core) == [Step.HELD]
    assert core.state is REMOTE_CLOSING and core.lingering
    assert list(core.inbox) == ["question"]
    assert core.send_message("answer")  # RFC 6455 5.5.1: the answer still goes first
    assert core.settle()
    assert core.state is CLOSED and (core.close_code, core.close_reason) == (4000, "bye")
    out = core.take_outgoing()
    assert out.startswith(data_frame("answer")) and close_frame_of(out) == (4000, b"bye")
    assert not core.send_message("too late")


def test_our_close_and_the_clients_answer() -> None:
    peer, core = client(), session()
    assert core.close(1001, "server shutting down")
    assert not core.close(1000, "")  # once
    assert core.state is LOCAL_CLOSING and core.close_code == 1001
    assert close_frame_of(core.take_outgoing()) == (1001, b"server shutting down")
    core.receive_data(bytes(peer.send_data("in flight")) + bytes(peer.close(1001)))
    assert steps(core) == [Step.CLOSED]
    assert core.state is CLOSED and not core.inbox  # what came after our close is dropped


def test_a_lost_connection_is_1006_and_drops_a_held_close() -> None:
    peer, core = client(), session()
    core.receive_data(bytes(peer.close(1000)))
    assert steps(core) == [Step.HELD]
    core.lost()
    assert core.pending is None and (core.close_code, core.close_reason) == (1006, "")
    assert not core.settle()


# -- deadlines --------------------------------------------------------------------------------


def test_ping_deadlines_are_computed_from_the_given_now() -> None:
    peer, core = client(), session(ping_interval=20.0, ping_timeout=5.0)
    pings = core.pings
    assert core.schedule_ping(100.0) == 120.0 == pings.at
    assert core.ping() and core.take_outgoing() == b"\x89\x08trioherd"
    assert pings.sent(121.0) == 126.0 == pings.by and pings.out
    core.receive_data(bytes(peer.pong(b"trioherd")))
    assert steps(core) == [Step.PONG, Step.IDLE]
    assert not pings.out
    core.receive_data(bytes(peer.pong(b"unasked")))
    assert steps(core) == [Step.IDLE]  # a pong nobody waits for is not news
    assert core.close(1000, "")
    assert not core.ping() and core.schedule_ping(130.0) == float("inf")


def test_no_pings_without_an_interval_and_no_pong_deadline_without_a_timeout() -> None:
    core = session(ping_interval=0.0, ping_timeout=0.0)
    assert core.schedule_ping(5.0) == float("inf")
    core.ping()
    assert core.pings.sent(5.0) == float("inf")


def test_the_close_deadline_is_the_earliest_asked_for() -> None:
    core = session()
    assert core.close_started(10.0) == 11.0
    assert core.close_started(10.5) == 11.0
    assert core.close_started(9.0) == 10.0


# -- permessage-deflate: inflated in bounded pieces ---------------------------------------------


def test_compressed_messages_with_context_takeover_and_fragments() -> None:
    peer, core = client(deflate=True), session(deflate=True)
    data = bytes(peer.send_data("hello hello hello"))
    data += bytes(peer.send_data("hello again, from the same window"))  # refers back
    data += bytes(peer.send_data(b"\x00\x01" * 100))
    data += bytes(peer.send_data("in two ", fin=False))
    data += bytes(peer.ping(b"between"))  # a control frame inside a compressed message
    data += bytes(peer.send_data("frames, é"))
    core.receive_data(data)
    assert steps(core) == [Step.IDLE]
    assert list(core.inbox) == [
        "hello hello hello",
        "hello again, from the same window",
        b"\x00\x01" * 100,
        "in two frames, é",
    ]
    assert b"\x8a\x07between" in core.take_outgoing()


def test_client_no_context_takeover_starts_each_message_afresh() -> None:
    offer = "permessage-deflate; client_no_context_takeover"
    peer = client(deflate=True, offer=offer)
    core = session(deflate=True, offer=offer)
    for text in ("one message", "one message again", "and a third"):
        core.receive_data(bytes(peer.send_data(text)))
        assert steps(core) == [Step.IDLE]
        assert core.inbox.popleft() == text


def test_a_big_compressed_message_is_inflated_piece_by_piece() -> None:
    peer, core = client(deflate=True), session(deflate=True, max_size=3 * INFLATE_PIECE)
    text = "x" * (3 * INFLATE_PIECE - 3) + "é!"  # exactly the limit in bytes, ~3 KiB sent
    wire = bytes(peer.send_data(text))
    assert len(wire) < 10_000
    core.receive_data(wire)
    seen = steps(core)
    assert seen.count(Step.BUSY) == 3 and seen[-1] is Step.IDLE
    assert core.inbox.popleft() == text


def test_a_compression_bomb_stops_at_the_limit_holding_no_more_than_a_piece_over_it() -> None:
    limit = 1 << 20
    peer, core = client(deflate=True), session(deflate=True, max_size=limit)
    wire = bytes(peer.send_data("x" * (64 << 20)))  # 64 MiB of "x": about 64 KB sent
    held = []
    core.receive_data(wire)
    for _ in range(1000):
        step = core.step()
        held.append(core.incoming.size)
        if step is not Step.BUSY:
            break
    assert step is Step.HELD and core.pending == (1009, "message too big")
    assert max(held) <= limit  # what is kept never passes the limit...
    assert len(held) <= limit // INFLATE_PIECE + 2  # ...and inflating stopped right there
    assert core.incoming.size == 0 and not core.inbox
    core.settle()
    assert close_frame_of(core.take_outgoing()) == (1009, b"message too big")


def test_bad_compressed_data_and_bad_utf8_inside_compressed_text_are_1007() -> None:
    core = session(deflate=True)
    core.receive_data(b"\xc1\x84\x00\x00\x00\x00\x01\x02\xff\xff")  # RSV1, not deflate
    assert steps(core) == [Step.HELD] and core.pending == (1007, "error in extension")
    core = session(deflate=True)
    deflate = zlib.compressobj(wbits=-15)
    body = deflate.compress(b"\xff\xfe not UTF-8") + deflate.flush(zlib.Z_SYNC_FLUSH)
    body = body[:-4]  # RFC 7692: the sync tail is not sent
    core.receive_data(bytes([0xC1, 0x80 | len(body)]) + b"\x00" * 4 + body)  # a zero mask
    assert steps(core) == [Step.HELD]
    assert core.pending is not None and core.pending[0] == 1007
    assert core.pending[1].startswith("'utf-8' codec can't decode byte 0xff")


def test_sent_frames_match_wsproto() -> None:
    """Without extensions the session frames data itself: the bytes wsproto would make."""
    reference = FrameProtocol(client=False, extensions=[])
    for message in ("", "text", "é" * 70, b"b" * 200, b"b" * 70_000, bytearray(b"ba")):
        assert data_frame(message) == bytes(reference.send_data(message))  # type: ignore[arg-type]
    peer_ext, ours = PerMessageDeflate(), BoundedDeflate()
    assert ours.accept("permessage-deflate") is not None
    peer_ext.accept("permessage-deflate")
    core = session(deflate=True)
    reference = FrameProtocol(client=False, extensions=[peer_ext])
    for message in ("compressed", "compressed again", b"\x00" * 1000):
        assert core.send_message(message)
        assert core.take_outgoing() == bytes(reference.send_data(message))
    assert core.state is OPEN


def test_compressed_frames_arriving_a_byte_at_a_time() -> None:
    """wsproto reads a frame's head again when its mask comes later, and hands over each
    byte of payload as it comes: the extension and the session take it piece by piece."""
    peer, core = client(deflate=True), session(deflate=True)
    wire = bytes(peer.send_data("byte by byte, " * 20, fin=False))
    wire += bytes(peer.send_data("and the end"))
    wire += bytes(peer.send_data(b"\x00" * 3000))
    for byte in wire:
        core.receive_data(bytes([byte]))
        assert steps(core) == [Step.IDLE]
    assert list(core.inbox) == ["byte by byte, " * 20 + "and the end", b"\x00" * 3000]
