"""Response framing, sans I/O: the bytes of a response for a status, fields and body, and
the keep-alive decision, with no socket and no event loop."""

from __future__ import annotations

import email.utils

import h11
import pytest

from trioherd.protocols.framing import (
    InvalidResponse,
    ResponseFraming,
    header_list,
    http_date,
    reason,
)


def framing(*, head_only: bool = False, keep_alive: bool = True) -> ResponseFraming:
    framer = ResponseFraming()
    framer.begin(head_only, keep_alive)
    return framer


def lines(head: bytes) -> list[bytes]:
    """The lines of a head, without date (it changes every second)."""
    assert head.endswith(b"\r\n\r\n")
    return [line for line in head[:-4].split(b"\r\n") if not line.startswith(b"date: ")]


def test_a_known_body_gets_its_content_length_and_goes_out_with_the_head() -> None:
    framer = framing()
    data = framer.complete(200, [(b"content-type", b"text/plain")], b"Hello")
    head, _, body = data.partition(b"\r\n\r\n")
    assert lines(head + b"\r\n\r\n") == [
        b"HTTP/1.1 200 OK",
        b"content-type: text/plain",
        b"server: trioherd",
        b"content-length: 5",
    ]
    assert body == b"Hello"
    assert framer.keep_alive


def test_a_body_of_unknown_length_is_chunked_on_a_keep_alive_connection() -> None:
    framer = framing()
    head = framer.head(200, [], None)
    assert b"transfer-encoding: chunked\r\n" in head and b"connection" not in head
    assert framer.wants_body()
    assert framer.body(b"abc") == b"3\r\nabc\r\n"
    assert framer.body(b"x" * 20) == b"14\r\n" + b"x" * 20 + b"\r\n"
    assert framer.body(b"") == b""  # an empty piece would end a chunked body: not sent
    assert framer.end() == b"0\r\n\r\n"
    assert framer.keep_alive


def test_a_body_of_unknown_length_is_delimited_by_the_close_when_the_connection_ends() -> None:
    framer = framing(keep_alive=False)  # e.g. an HTTP/1.0 client
    head = framer.head(200, [], None)
    assert b"transfer-encoding" not in head and b"content-length" not in head
    assert lines(head)[-1] == b"connection: close"
    assert framer.body(b"abc") == b"abc"
    assert framer.end() == b""


def test_a_declared_length_frames_a_streamed_body() -> None:
    framer = framing()
    head = framer.head(200, [(b"Content-Length", b"6")], None)
    assert b"Content-Length: 6\r\n" in head and b"chunked" not in head
    assert framer.body(b"abc") == b"abc"
    assert framer.body(b"def") == b"def"
    assert framer.end() == b""

    framer = framing()
    framer.head(200, [(b"content-length", b"0")], None)
    assert not framer.wants_body() and framer.end() == b""


def test_a_streamed_body_longer_than_declared_is_refused() -> None:
    framer = framing()
    framer.head(200, [(b"content-length", b"4")], None)
    assert framer.body(b"abc") == b"abc"
    with pytest.raises(InvalidResponse, match="longer"):
        framer.body(b"de")


def test_a_streamed_body_shorter_than_declared_is_refused_at_its_end() -> None:
    framer = framing()
    framer.head(200, [(b"content-length", b"4")], None)
    framer.body(b"abc")
    with pytest.raises(InvalidResponse, match="shorter"):
        framer.end()


def test_a_known_body_that_does_not_match_the_declared_length_is_refused() -> None:
    with pytest.raises(InvalidResponse, match="content-length 4 but a body of 5"):
        framing().complete(200, [(b"content-length", b"4")], b"Hello")


def test_head_keeps_the_declared_length_and_sends_no_body() -> None:
    framer = framing(head_only=True)
    data = framer.complete(200, [(b"content-length", b"10")], b"")  # as Starlette does
    assert b"content-length: 10\r\n" in data and data.endswith(b"\r\n\r\n")
    assert not framer.wants_body()
    assert framer.body(b"0123456789") == b""
    assert framer.end() == b""

    framer = framing(head_only=True)
    data = framer.complete(200, [], b"Hello")  # the GET's body: its length, not its bytes
    assert data.endswith(b"content-length: 5\r\n\r\n")

    framer = framing(head_only=True)
    head = framer.head(200, [], None)  # a streamed body: no chunks on a HEAD
    assert b"transfer-encoding: chunked\r\n" in head
    assert framer.body(b"abc") == b"" and framer.end() == b""


def test_204_drops_its_content_length_and_any_body() -> None:
    framer = framing()
    data = framer.complete(204, [(b"content-length", b"5")], b"Hello")
    assert b"content-length" not in data and data.endswith(b"\r\n\r\n")
    assert not framer.wants_body()
    assert framer.keep_alive

    framer = framing()
    head = framer.head(204, [], None)
    assert b"transfer-encoding" not in head and b"content-length" not in head
    assert framer.body(b"x") == b"" and framer.end() == b""


def test_304_keeps_a_declared_content_length_but_sends_no_body() -> None:
    framer = framing()
    data = framer.complete(304, [(b"content-length", b"5")], b"Hello")
    assert data.startswith(b"HTTP/1.1 304 Not Modified\r\n")
    assert b"content-length: 5\r\n" in data and data.endswith(b"\r\n\r\n")


def test_a_content_length_given_twice_with_one_value_is_sent_once() -> None:
    data = framing().complete(
        200, [(b"content-length", b"5"), (b"Content-Length", b"5")], b"Hello"
    )
    assert data.lower().count(b"content-length") == 1


@pytest.mark.parametrize(
    "values", [[b"5", b"6"], [b"x5"], [b"-5"], [b"5 "], [b""], [b"0x5"]], ids=repr
)
def test_a_bad_or_conflicting_content_length_is_refused(values: list[bytes]) -> None:
    with pytest.raises(InvalidResponse, match="content-length"):
        framing().head(200, [(b"content-length", value) for value in values], None)


@pytest.mark.parametrize(
    "name", [b"", b"x a", b"x:a", b"x\ra", b"(x)", b"caf\xc3\xa9", b"x\x00"], ids=repr
)
def test_a_bad_field_name_is_refused(name: bytes) -> None:
    with pytest.raises(InvalidResponse, match="invalid response header"):
        framing().complete(200, [(name, b"v")], b"")


@pytest.mark.parametrize(
    "value", [b"a\x01b", b"a\r\nb", b"a\nb", b"a\x7fb", b" a", b"a ", b"\ta", b"a\t"], ids=repr
)
def test_a_bad_field_value_is_refused(value: bytes) -> None:
    with pytest.raises(InvalidResponse, match="invalid response header"):
        framing().complete(200, [(b"x-a", value)], b"")


@pytest.mark.parametrize("value", [b"a\tb", b"a b", b"", b"caf\xc3\xa9", b"!#$%&'*+.^_`|~"])
def test_a_field_value_h11_accepts_is_sent_as_given(value: bytes) -> None:
    assert b"\r\nx-a: " + value + b"\r\n" in framing().complete(200, [(b"x-a", value)], b"")


def test_fields_checked_before_are_still_checked_by_name_and_value_together() -> None:
    # the fields an app sends again are remembered as good; a bad value under a good
    # name, or a good value under a bad name, is refused every time
    for _ in range(3):
        assert b"\r\nx-a: good\r\n" in framing().complete(200, [(b"x-a", b"good")], b"")
        with pytest.raises(InvalidResponse, match="invalid response header"):
            framing().complete(200, [(b"x-a", b"bad\r\nx-b: smuggled")], b"")
        with pytest.raises(InvalidResponse, match="invalid response header"):
            framing().complete(200, [(b"x a", b"good")], b"")


def test_the_memory_of_checked_fields_is_bounded() -> None:
    from trioherd.protocols import framing as _framing

    for n in range(_framing._CHECKED_MAX + 10):  # all different values: each one is new
        framing().complete(200, [(b"x-n", b"%d" % n)], b"")
    long = b"v" * (_framing._CHECKED_VALUE_MAX + 1)
    framing().complete(200, [(b"x-long", long)], b"")
    assert len(_framing._CHECKED) <= _framing._CHECKED_MAX
    assert (b"x-long", long) not in _framing._CHECKED


@pytest.mark.parametrize("status", [100, 101, 103, 199, 0, -1, 1000])
def test_an_interim_or_impossible_status_is_refused(status: int) -> None:
    with pytest.raises(InvalidResponse, match="invalid response status"):
        framing().complete(status, [], b"")


def test_a_status_http_does_not_name_has_an_empty_reason() -> None:
    assert framing().complete(599, [], b"").startswith(b"HTTP/1.1 599 \r\n")
    assert framing().complete(999, [], b"").startswith(b"HTTP/1.1 999 \r\n")
    assert reason(404) == b"Not Found" and reason(599) == b""


def test_connection_close_from_the_app_ends_keep_alive_and_is_sent_once() -> None:
    framer = framing()
    head = framer.head(200, [(b"Connection", b"Close")], None)
    assert not framer.keep_alive
    assert head.lower().count(b"connection:") == 1 and b"connection: close\r\n" in head
    assert b"chunked" not in head  # delimited by the close instead
    assert framer.body(b"abc") == b"abc"


def test_the_apps_connection_field_is_merged_with_ours() -> None:
    framer = framing()
    head = framer.head(200, [(b"connection", b"keep-alive")], 0)
    assert framer.keep_alive and lines(head)[-1] == b"connection: keep-alive"

    framer = framing(keep_alive=False)  # our close wins, and the field is sent once
    head = framer.head(200, [(b"connection", b"keep-alive")], 0)
    assert head.lower().count(b"connection:") == 1 and lines(head)[-1] == b"connection: close"


def test_close_for_a_drain_or_an_error_adds_connection_close() -> None:
    framer = framing()
    data = framer.complete(200, [], b"Hello", close=True)
    assert not framer.keep_alive and b"connection: close\r\n" in data
    assert data.endswith(b"content-length: 5\r\nconnection: close\r\n\r\nHello")

    framer = framing()
    head = framer.head(200, [], None, True)
    assert b"chunked" not in head and b"connection: close\r\n" in head


def test_date_and_server_are_added_unless_the_app_gave_its_own() -> None:
    head = framing().head(200, [], 0)
    assert b"\r\ndate: " + http_date() + b"\r\n" in head and b"\r\nserver: trioherd\r\n" in head

    given = [(b"Date", b"Tue, 01 Jan 2030 00:00:00 GMT"), (b"Server", b"mine")]
    head = framing().head(200, given, 0)
    assert head.lower().count(b"date:") == 1 and head.lower().count(b"server:") == 1
    assert b"Server: mine\r\n" in head and b"Date: Tue, 01 Jan 2030" in head


def test_the_apps_chunked_transfer_encoding_is_replaced_by_ours() -> None:
    framer = framing()
    head = framer.head(200, [(b"Transfer-Encoding", b"Chunked")], None)
    assert head.lower().count(b"transfer-encoding") == 1
    assert b"transfer-encoding: chunked\r\n" in head

    with pytest.raises(InvalidResponse, match="unsupported transfer-encoding"):
        framing().head(200, [(b"transfer-encoding", b"gzip")], None)


def test_fields_keep_their_order_and_case() -> None:
    head = framing().head(201, [(b"X-B", b"2"), (b"x-a", b"1"), (b"X-B", b"3")], 0)
    assert lines(head) == [
        b"HTTP/1.1 201 Created",
        b"X-B: 2",
        b"x-a: 1",
        b"X-B: 3",
        b"server: trioherd",
        b"content-length: 0",
    ]


def test_one_framing_object_serves_request_after_request() -> None:
    framer = ResponseFraming()
    framer.begin(True, False)
    framer.head(200, [(b"connection", b"close")], None)
    assert not framer.keep_alive and not framer.wants_body()

    framer.begin(False, True)  # the next request starts afresh
    head = framer.head(200, [], None)
    assert framer.keep_alive and framer.wants_body() and b"chunked" in head
    assert b"connection" not in head
    assert framer.body(b"ab") == b"2\r\nab\r\n"


def test_http_date_is_an_rfc_9110_date_of_now() -> None:
    value = http_date().decode()
    assert value.endswith(" GMT") and len(value) == 29
    assert email.utils.parsedate_to_datetime(value).tzname() == "UTC"


def test_header_list_gives_lower_case_names_in_order() -> None:
    parser = h11.Connection(h11.SERVER)
    parser.receive_data(b"GET / HTTP/1.1\r\nHost: t\r\nX-A: 1\r\nx-a: 2\r\n\r\n")
    request = parser.next_event()
    assert isinstance(request, h11.Request)
    assert header_list(request) == [(b"host", b"t"), (b"x-a", b"1"), (b"x-a", b"2")]


def test_a_refused_response_does_not_spoil_the_error_answer_after_it() -> None:
    framer = framing()
    with pytest.raises(InvalidResponse):
        framer.head(200, [(b"content-length", b"3"), (b"x-a", b"\x00")], None)
    data = framer.complete(500, [], b"500 Internal Server Error\n", close=True)
    assert data.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert b"content-length: 26\r\nconnection: close\r\n\r\n" in data


def test_a_head_made_again_from_memory_is_the_same_head_with_the_same_decision() -> None:
    from trioherd.protocols import framing as _framing

    _framing._HEADS.clear()
    cases = [
        (200, [(b"content-type", b"text/plain")], b"Hello", True, False),
        (200, [(b"connection", b"close")], b"Hello", True, False),  # the app ends it
        (200, [(b"x-a", b"1")], b"Hello", False, False),  # the request ends it
        (200, [(b"content-length", b"5")], b"", True, True),  # HEAD
        (204, [(b"content-length", b"0")], b"", True, False),
        (304, [], b"", True, False),
    ]
    for status, fields, body, keep_alive, head_only in cases:
        made = []
        for _ in range(3):  # made, then twice from memory
            framer = framing(head_only=head_only, keep_alive=keep_alive)
            data = framer.complete(status, fields, body)
            made.append((data, framer.keep_alive, framer.wants_body(), framer.body(b"x")))
        assert made[0] == made[1] == made[2], (status, fields)
    assert _framing._HEADS  # (or the test would prove nothing)


def test_the_same_fields_as_lists_or_other_bytes_like_objects_make_the_same_response() -> None:
    as_tuples = framing().complete(200, [(b"x-a", b"1"), (b"x-b", b"2")], b"ok")
    as_lists = framing().complete(
        200, [[b"x-a", b"1"], [bytearray(b"x-b"), memoryview(b"2")]], b"ok"
    )
    assert as_lists == as_tuples


def test_a_field_refused_once_is_refused_every_time() -> None:
    for _ in range(3):
        with pytest.raises(InvalidResponse, match="invalid response header"):
            framing().complete(200, [(b"x-a", b"bad\r\nx-b: smuggled")], b"")
        with pytest.raises(InvalidResponse, match="invalid content-length"):
            framing().complete(200, [(b"content-length", b"5"), (b"content-length", b"6")], b"")


def test_heads_in_memory_carry_the_date_of_now_and_are_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from trioherd.protocols import framing as _framing

    now = [1_800_000_000.0]
    monkeypatch.setattr(_framing.time, "time", lambda: now[0])
    first = framing().complete(200, [], b"")
    assert b"date: " + email.utils.formatdate(now[0], usegmt=True).encode() in first
    now[0] += 1
    second = framing().complete(200, [], b"")
    assert b"date: " + email.utils.formatdate(now[0], usegmt=True).encode() in second
    for n in range(_framing._HEADS_MAX + 10):
        framing().complete(200, [(b"x-n", b"%d" % n)], b"")
    assert len(_framing._HEADS) <= _framing._HEADS_MAX
