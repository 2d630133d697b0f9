"""The HTTP/2 core without I/O (``protocols.h2core``, ``protocols.h2scan``), attacked by a real
h2 client connection in memory: its bytes are fed to the core and the core's back to it.

Every defense has a test that fails without it; where h2 itself is the defense, the test
shows it holds with the settings the core gives h2. The clock is the fake state's number.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import (
    ConnectionTerminated,
    DataReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    SettingsFrame,
)

from trioherd._config import Config
from trioherd.protocols import h2core, h2scan
from trioherd.protocols.forwarded import TrustedPeers
from trioherd.protocols.h1core import ClientGone
from trioherd.protocols.h2core import (
    BodyOverLimit,
    ClientGoAway,
    H2Core,
    MustClose,
    NewStream,
    StreamBody,
    StreamRefused,
    WindowOpened,
)
from trioherd.protocols.h2core import StreamReset as CoreReset
from trioherd.protocols.shared import APP, HEAD, IDLE, Stats

PEER = ("203.0.113.7", 50000)
GET = [
    (b":method", b"GET"),
    (b":path", b"/a?b=1"),
    (b":scheme", b"http"),
    (b":authority", b"example.com"),
]


class State:
    """A worker's shared state as the core reads it (``protocols.shared.Shared``), with a
    clock the test moves."""

    def __init__(self, **options: Any) -> None:
        self.config = Config(**options)
        self.stats = Stats()
        self.draining = False
        self.drain_grace = 1.0
        self.trusted = TrustedPeers(self.config.forwarded_allow_ips)
        self.worker_id = 0
        self.on_request = None
        self.clock = 100.0

    def now(self) -> float:
        return self.clock

    def idle_wait(self) -> float:
        return self.drain_grace if self.draining else self.config.keep_alive_timeout


class Pair:
    """A core and an h2 client, connected (preface and SETTINGS exchanged, both ACKed)."""

    def __init__(self, settings: bool = True, **options: Any) -> None:
        self.state = State(**options)
        self.core = H2Core(self.state, PEER, None)  # type: ignore[arg-type]
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.client.initiate_connection()
        assert self.send() == []
        if settings:  # the client reads our SETTINGS (and ACKs them)
            self.back()
            assert self.send() == []

    def send(self, raw: bytes = b"") -> list[Any]:
        """The client's pending bytes (and ``raw`` frames after them) into the core."""
        return self.core.receive(self.client.data_to_send() + raw)

    def back(self) -> list[Any]:
        """The core's pending bytes into the client: its events."""
        return self.client.receive_data(self.core.data_to_send())

    def body(self, sid: int, data: bytes, end: bool = False) -> None:
        """The client sends ``data`` on stream ``sid``, in frames of the size it may."""
        for start in range(0, len(data), 16384):
            last = start + 16384 >= len(data)
            self.client.send_data(sid, data[start : start + 16384], end_stream=end and last)

    def request(self, headers: list[tuple[bytes, bytes]] = GET, end: bool = True) -> int:
        sid = self.client.get_next_available_stream_id()
        self.client.send_headers(sid, headers, end_stream=end)
        return sid


def closed_with(events: list[Any], code: ErrorCodes) -> ConnectionTerminated:
    """The client's view: the connection ended with GOAWAY ``code``."""
    ends = [e for e in events if isinstance(e, ConnectionTerminated)]
    assert ends and ends[-1].error_code == code, events
    return ends[-1]


def frames(data: bytes) -> list[tuple[int, int, int]]:
    """The frames in bytes the core sent: (type, stream, the error code of a RST_STREAM or
    GOAWAY, else 0)."""
    found = []
    while data:
        length, kind, sid = (
            int.from_bytes(data[:3], "big"),
            data[3],
            int.from_bytes(data[5:9], "big"),
        )
        payload = data[9 : 9 + length]
        code = {0x3: payload[:4], 0x7: payload[4:8]}.get(kind, b"")
        found.append((kind, sid, int.from_bytes(code, "big")))
        data = data[9 + length :]
    return found


# -- requests, responses, flow control -------------------------------------------------------


def test_a_get_becomes_one_new_stream_and_its_answer_reaches_the_client() -> None:
    pair = Pair()
    sid = pair.request([*GET, (b"cookie", b"a=1"), (b"cookie", b"b=2")])
    (event,) = pair.send()
    assert isinstance(event, NewStream)
    assert (event.stream_id, event.method, event.path, event.authority) == (
        sid,
        b"GET",
        b"/a?b=1",
        b"example.com",
    )
    assert (event.scheme, event.client, event.end) == ("http", PEER, True)
    assert (b"host", b"example.com") in event.headers  # from :authority
    assert (b"cookie", b"a=1; b=2") in event.headers  # crumbs joined (RFC 9113 8.2.3)
    assert pair.core.phase is APP and pair.core.deadline == math.inf
    pair.core.respond(sid, 200, [(b"Content-Type", b"text/plain"), (b"Connection", b"close")])
    assert pair.core.send_data(sid, b"hello", end=True) == 5
    pair.core.finish(sid)
    got = pair.back()
    (head,) = [e for e in got if isinstance(e, ResponseReceived)]
    names = dict(head.headers)
    assert names[b":status"] == b"200" and names[b"content-type"] == b"text/plain"
    assert b"connection" not in names and b"date" in names and names[b"server"] == b"trioherd"
    assert b"".join(e.data for e in got if isinstance(e, DataReceived)) == b"hello"
    assert any(isinstance(e, StreamEnded) for e in got)
    assert pair.core.phase is IDLE and not pair.core.streams


def test_a_body_refills_the_windows_only_as_the_app_reads_it() -> None:
    pair = Pair()
    sid = pair.request([(b":method", b"POST"), *GET[1:]], end=False)
    body = b"x" * 200_000
    room = pair.client.local_flow_control_window(sid)
    assert room == h2core.INITIAL_WINDOW_SIZE
    pair.body(sid, body[:room])
    events = pair.send()
    got = b"".join(e.data for e in events if isinstance(e, StreamBody))
    assert got == body[:room]
    pair.back()
    assert pair.client.local_flow_control_window(sid) == 0  # unread: the client waits
    pair.core.consumed(sid, len(got))  # the app read it
    pair.back()
    assert pair.client.local_flow_control_window(sid) == room  # now it may send again


def test_a_send_takes_what_the_window_lets_and_the_rest_waits_for_window_opened() -> None:
    pair = Pair()
    sid = pair.request()
    pair.send()
    pair.core.respond(sid, 200, [])
    body = b"y" * 100_000
    sent = pair.core.send_data(sid, body, end=True)
    assert sent == 65535 and pair.core.sendable(sid) == 0
    got = pair.back()
    data = [e for e in got if isinstance(e, DataReceived)]
    assert all(len(e.data) <= 16384 for e in data)  # frames the client accepts
    pair.client.acknowledge_received_data(sum(e.flow_controlled_length for e in data), sid)
    events = pair.send()
    assert WindowOpened(sid) in events or WindowOpened(0) in events
    rest = body[sent:]
    assert pair.core.send_data(sid, rest, end=True) == len(rest)
    assert any(isinstance(e, StreamEnded) for e in pair.back())


def test_trailers_end_the_response_and_head_requests_get_no_body() -> None:
    pair = Pair()
    sid = pair.request()
    head = pair.request([(b":method", b"HEAD"), *GET[1:]])
    pair.send()
    pair.core.respond(sid, 200, [])
    pair.core.send_data(sid, b"body")
    pair.core.send_trailers(sid, [(b"Grpc-Status", b"0")])
    pair.core.respond(head, 200, [(b"content-length", b"4")])
    assert pair.core.send_data(head, b"body", end=True) == 4  # taken, dropped
    got = pair.back()
    (trailers,) = [e for e in got if isinstance(e, TrailersReceived)]
    assert trailers.headers == [(b"grpc-status", b"0")]
    assert [e.stream_id for e in got if isinstance(e, DataReceived) and e.data] == [sid]


def test_a_stream_the_client_reset_refuses_the_app_s_sends() -> None:
    pair = Pair()
    sid = pair.request()
    pair.send()
    pair.client.reset_stream(sid)
    assert pair.send() == [CoreReset(sid, 0)]
    with pytest.raises(ClientGone):
        pair.core.respond(sid, 200, [])


def test_the_client_s_goaway_and_its_end_close_the_connection() -> None:
    pair = Pair()
    pair.client.close_connection()
    assert pair.send() == [ClientGoAway(0, 0)]
    assert pair.core.finished
    assert Pair().core.receive(b"") == [MustClose("client_closed", 0)]


def test_trusted_forwarded_headers_give_the_client_and_the_scheme() -> None:
    pair = Pair(forwarded_allow_ips="203.0.113.7")
    pair.request([*GET, (b"x-forwarded-for", b"198.51.100.9"), (b"x-forwarded-proto", b"https")])
    (event,) = pair.send()
    assert event.client[0] == "198.51.100.9" and event.scheme == "https"


# -- limits --------------------------------------------------------------------------------


def test_max_concurrent_streams_is_advertised_and_enforced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Pair().client.remote_settings.max_concurrent_streams == 100
    monkeypatch.setattr(h2core, "MAX_CONCURRENT_STREAMS", 5)
    pair = Pair(settings=False)  # a client that ignores our SETTINGS
    for _ in range(5):
        pair.request(end=False)
    assert len(pair.send()) == 5
    pair.request(end=False)
    (end,) = pair.send()
    assert end.reason == "protocol_error" and end.error_code == ErrorCodes.PROTOCOL_ERROR
    closed_with(pair.back(), ErrorCodes.PROTOCOL_ERROR)


def test_a_head_over_max_header_size_is_answered_431_without_the_app() -> None:
    pair = Pair(max_header_size=1024)
    assert pair.client.remote_settings.max_header_list_size == 1024 + 28 * 100
    sid = pair.request([*GET, (b"x-big", b"v" * 1100)])
    assert pair.send() == [StreamRefused(sid, 431, "request head too large")]
    (head,) = [e for e in pair.back() if isinstance(e, ResponseReceived)]
    assert dict(head.headers)[b":status"] == b"431"
    assert pair.core.phase is IDLE  # the connection goes on
    pair.request()
    assert isinstance(pair.send()[0], NewStream)


def test_an_hpack_bomb_ends_the_connection_before_it_is_decoded_in_full() -> None:
    # 12 fields of 4000 bytes: ~48 kB decoded from a block of ~4 kB (the first field is
    # indexed, the next eleven are one byte each): past twice the advertised list size
    # (38,368 bytes), under h2's own default bound (64 KiB)
    pair = Pair()
    bomb = GET + [(b"x-bomb", b"b" * 4000)] * 12
    pair.request(bomb)
    (end,) = pair.send()
    assert end == MustClose("hpack_bomb", ErrorCodes.ENHANCE_YOUR_CALM)
    closed_with(pair.back(), ErrorCodes.ENHANCE_YOUR_CALM)


def test_a_frame_over_max_frame_size_ends_the_connection() -> None:
    pair = Pair()
    assert pair.client.remote_settings.max_frame_size == h2core.MAX_FRAME_SIZE
    sid = pair.request(end=False)
    pair.send()
    (end,) = pair.core.receive(DataFrame(sid, b"z" * (h2core.MAX_FRAME_SIZE + 1)).serialize())
    assert end == MustClose("frame_too_large", ErrorCodes.FRAME_SIZE_ERROR)


def test_a_declared_body_over_max_body_size_is_answered_413_and_stopped() -> None:
    pair = Pair(max_body_size=1000)
    sid = pair.request([(b":method", b"POST"), *GET[1:], (b"content-length", b"1001")], end=False)
    assert pair.send() == [StreamRefused(sid, 413, "request body too large")]
    got = pair.back()
    (head,) = [e for e in got if isinstance(e, ResponseReceived)]
    assert dict(head.headers)[b":status"] == b"413"
    (reset,) = [e for e in got if isinstance(e, StreamReset)]
    assert reset.error_code == ErrorCodes.NO_ERROR  # stop sending, without error


def test_a_body_growing_past_max_body_size_is_cut_and_its_bytes_given_back() -> None:
    pair = Pair(max_body_size=1000)
    sid = pair.request([(b":method", b"POST"), *GET[1:]], end=False)
    pair.send()
    pair.client.send_data(sid, b"a" * 600)
    assert pair.send() == [StreamBody(sid, b"a" * 600, False)]
    pair.client.send_data(sid, b"b" * 600)
    assert pair.send() == [BodyOverLimit(sid, 1200)]
    # the dropped bytes go back to the windows (the app reads none of them): the client
    # is never blocked, past the connection's window too
    for _ in range(h2core.CONNECTION_WINDOW // 16384 + 20):
        assert pair.client.local_flow_control_window(sid) >= 16384
        pair.body(sid, b"c" * 16384)
        assert pair.send() == []  # dropped
        pair.back()
    pair.core.refuse(sid, 413)
    got = pair.back()
    (head,) = [e for e in got if isinstance(e, ResponseReceived)]
    assert dict(head.headers)[b":status"] == b"413"
    assert not pair.core.streams


# -- floods ------------------------------------------------------------------------------------


def test_a_stream_reset_in_the_read_that_opened_it_never_reaches_the_driver() -> None:
    pair = Pair()
    sid = pair.request(end=False)
    pair.client.reset_stream(sid)
    assert pair.send() == []
    assert not pair.core.streams


def test_rapid_reset_ends_the_connection_with_enhance_your_calm() -> None:
    pair = Pair()
    events: list[Any] = []
    for _ in range(h2scan.RESET_LIMIT):  # at the limit: still served
        sid = pair.request(end=False)
        pair.client.reset_stream(sid)
        events += pair.send()
    assert events == []
    sid = pair.request(end=False)
    pair.client.reset_stream(sid)
    assert pair.send() == [MustClose("rapid_reset", ErrorCodes.ENHANCE_YOUR_CALM)]
    closed_with(pair.back(), ErrorCodes.ENHANCE_YOUR_CALM)


def test_resets_of_streams_mostly_served_are_no_rapid_reset() -> None:
    pair = Pair()
    for _ in range(3 * h2scan.RESET_LIMIT):
        served = pair.request()
        pair.send()
        pair.core.respond(served, 204, [], end=True)
        pair.core.finish(served)
        if served % 3 == 1:  # every third request is reset by the client
            sid = pair.request(end=False)
            pair.send()
            pair.client.reset_stream(sid, ErrorCodes.CANCEL)
            assert pair.send() == [CoreReset(sid, 8)]
        pair.back()
    assert not pair.core.finished


def test_a_continuation_flood_ends_at_the_header_block_bound() -> None:
    # 40 CONTINUATION frames of 16 KiB: h2 alone keeps up to 64 of them (1 MiB) in memory
    pair = Pair()
    frames = HeadersFrame(1, b"\x82" * 100).serialize()  # no END_HEADERS
    frames += b"".join(ContinuationFrame(1, b"\x82" * 16384).serialize() for _ in range(40))
    assert pair.core.receive(frames) == [MustClose("header_flood", ErrorCodes.ENHANCE_YOUR_CALM)]
    closed_with(pair.back(), ErrorCodes.ENHANCE_YOUR_CALM)


def test_h2_bounds_a_flood_of_empty_continuation_frames() -> None:
    pair = Pair()
    frames = HeadersFrame(1, b"\x82").serialize()
    frames += b"".join(ContinuationFrame(1).serialize() for _ in range(100))
    (end,) = pair.core.receive(frames)
    assert end.reason == "protocol_error"


@pytest.mark.parametrize(
    ("kind", "frame"),
    [
        ("settings", SettingsFrame(0).serialize()),
        ("ping", PingFrame(0, b"12345678").serialize()),
        ("priority", PriorityFrame(1, depends_on=0, stream_weight=15).serialize()),
        ("empty_data", DataFrame(1).serialize()),
    ],
)
def test_control_frame_floods_end_the_connection_before_h2_answers_them(
    kind: str, frame: bytes
) -> None:
    pair = Pair()
    pair.request(end=False)
    pair.send()
    left = h2scan.FLOOD_LIMITS[kind] - pair.core.scan.floods[kind].count  # the client's own
    assert pair.core.receive(frame * left) == []  # at the limit: fine
    pair.core.data_to_send()
    assert pair.core.receive(frame) == [MustClose(f"{kind}_flood", ErrorCodes.ENHANCE_YOUR_CALM)]
    # a GOAWAY alone: h2 did nothing for the last frame
    assert frames(pair.core.data_to_send()) == [(0x7, 0, ErrorCodes.ENHANCE_YOUR_CALM)]


def test_flood_counts_start_again_in_each_window() -> None:
    pair = Pair()
    ping = PingFrame(0, b"12345678").serialize()
    limit = h2scan.FLOOD_LIMITS["ping"]
    assert pair.core.receive(ping * limit) == []
    pair.state.clock += h2scan.FLOOD_WINDOW
    assert pair.core.receive(ping * limit) == []


def test_frame_heads_split_across_reads_are_counted_once() -> None:
    pair = Pair()
    ping = PingFrame(0, b"12345678").serialize()
    data = ping * (h2scan.FLOOD_LIMITS["ping"] + 1)
    out: list[Any] = []
    for start in range(0, len(data), 7):
        out += pair.core.receive(data[start : start + 7])
    assert out == [MustClose("ping_flood", ErrorCodes.ENHANCE_YOUR_CALM)]


# -- deadlines and the drain -----------------------------------------------------------------------


def test_idle_and_head_deadlines() -> None:
    pair = Pair(keep_alive_timeout=5.0, header_timeout=2.0)
    core, state = pair.core, pair.state
    assert core.phase is IDLE and core.deadline == state.clock + 5.0
    state.clock += 1
    pair.send(HeadersFrame(1, b"\x82").serialize())  # a header block begun
    assert core.phase is HEAD and core.deadline == state.clock + 2.0
    state.clock += 1
    pair.send(ContinuationFrame(1, b"\x84").serialize())  # more of it: the deadline holds
    assert core.deadline == state.clock + 1.0
    assert core.expire() == MustClose("head_timeout", ErrorCodes.ENHANCE_YOUR_CALM)
    assert core.expired is HEAD and core.finished
    closed_with(pair.back(), ErrorCodes.ENHANCE_YOUR_CALM)


def test_a_connection_idle_again_waits_the_keep_alive_from_then_and_expires_gracefully() -> None:
    pair = Pair(keep_alive_timeout=5.0)
    sid = pair.request()
    pair.send()
    pair.state.clock += 30
    pair.core.respond(sid, 204, [], end=True)
    pair.core.finish(sid)
    assert pair.core.phase is IDLE and pair.core.deadline == pair.state.clock + 5.0
    assert pair.core.expire() == MustClose("idle", 0)
    closed_with(pair.back(), ErrorCodes.NO_ERROR)


def test_a_drain_sends_goaway_0_serves_open_streams_and_refuses_later_ones() -> None:
    pair = Pair()
    sid = pair.request()
    pair.send()
    pair.core.start_drain()
    goaway = closed_with(pair.back(), ErrorCodes.NO_ERROR)
    assert goaway.last_stream_id == sid
    # the client's h2 sends and reads nothing after a GOAWAY: raw frames from here on
    block = pair.client.encoder.encode(GET)
    later = HeadersFrame(sid + 2, block, flags=["END_HEADERS", "END_STREAM"]).serialize()
    assert pair.core.receive(later) == []  # refused: never given to the driver
    assert frames(pair.core.data_to_send()) == [(0x3, sid + 2, ErrorCodes.REFUSED_STREAM)]
    assert not pair.core.finished
    pair.core.respond(sid, 200, [])  # the open stream is still answered
    pair.core.send_data(sid, b"ok", end=True)
    pair.core.finish(sid)
    assert [kind for kind, _, _ in frames(pair.core.data_to_send())] == [0x1, 0x0]
    assert pair.core.finished


def test_max_requests_per_connection_drains_after_the_last() -> None:
    pair = Pair(max_requests_per_connection=2)
    pair.request()
    pair.request()
    pair.request()
    events = pair.send()
    assert [type(e) for e in events] == [NewStream, NewStream]
    assert pair.core.last_stream_id == 3


def test_an_app_that_returns_mid_response_resets_its_stream() -> None:
    pair = Pair()
    sid = pair.request()
    pair.send()
    pair.core.respond(sid, 200, [])
    pair.core.finish(sid)
    (reset,) = [e for e in pair.back() if isinstance(e, StreamReset)]
    assert reset.error_code == ErrorCodes.INTERNAL_ERROR
    assert not pair.core.streams
