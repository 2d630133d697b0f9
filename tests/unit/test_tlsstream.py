"""TLS on the worker's raw socket (``protocols.tlsstream.TLSSocketStream``), in process over
real socket pairs, against a client that is Python's own ``ssl.SSLObject`` whose records
the test moves by hand, so that it decides which records share a segment: the request
that comes with the client's Finished, records that pile up behind one another, a record
cut in two, a refusal's alert, both close_notify, and the worker's flusher and interrupt."""

from __future__ import annotations

import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing
import trustme

from trioherd.protocols.rawstream import EdgeWaiter
from trioherd.protocols.tlsstream import PIECE, TLSSocketStream

pytestmark = pytest.mark.trio

CA = trustme.CA()
CERT = CA.issue_cert("127.0.0.1")


def server_context(maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    CERT.configure_cert(context)
    context.set_alpn_protocols(["http/1.1"])
    if maximum is not None:
        context.maximum_version = maximum
    return context


def client_context(minimum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    CA.configure_trust(context)
    context.set_alpn_protocols(["http/1.1"])
    if minimum is not None:
        context.minimum_version = minimum
    return context


class Client:
    """A TLS client whose records go out only when the test says so (``flush``)."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext) -> None:
        self.sock = trio.socket.from_stdlib_socket(sock)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")

    async def flush(self) -> None:
        data = self.outgoing.read()
        while data:
            data = data[await self.sock.send(data) :]

    async def pull(self) -> bool:
        data = await self.sock.recv(1 << 20)
        if data:
            self.incoming.write(data)
        return bool(data)

    async def handshake(self, then: bytes = b"") -> None:
        """The client's side; ``then``: plaintext sent in the same segment as its
        Finished."""
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self.flush()
                await self.pull()
        if then:
            self.tls.write(then)
        await self.flush()

    def records(self, *pieces: bytes) -> bytes:
        """The ciphertext of each piece, one record each, not sent."""
        for piece in pieces:
            self.tls.write(piece)
        return self.outgoing.read()

    async def read(self, size: int) -> bytes:
        """``size`` bytes of plaintext (fewer only at the server's close_notify)."""
        got = b""
        while len(got) < size:
            try:
                part = self.tls.read(size - len(got))
            except ssl.SSLWantReadError:
                if not await self.pull():
                    raise EOFError("closed without close_notify") from None
                continue
            if not part:
                break  # close_notify
            got += part
        return got


@asynccontextmanager
async def connection(
    context: ssl.SSLContext | None = None, client: ssl.SSLContext | None = None
) -> AsyncIterator[tuple[TLSSocketStream, Client, EdgeWaiter]]:
    ours, theirs = socket.socketpair()
    waiter = EdgeWaiter()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter.run)
        stream = TLSSocketStream(ours, context or server_context(), waiter)
        try:
            yield stream, Client(theirs, client or client_context()), waiter
        finally:
            stream.close()
            theirs.close()
            nursery.cancel_scope.cancel()


async def handshake(stream: TLSSocketStream, client: Client, then: bytes = b"") -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.do_handshake)
        await client.handshake(then)


async def test_a_request_that_came_with_the_clients_finished_is_read_without_a_wait() -> None:
    async with connection() as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client, then=b"GET / HTTP/1.1\r\n\r\n")
            assert stream.ssl_object.version() == "TLSv1.3"
            assert stream.ssl_object.selected_alpn_protocol() == "http/1.1"
            assert await stream.receive_some() == b"GET / HTTP/1.1\r\n\r\n"
            await stream.send_all(b"HTTP/1.1 200 OK\r\n\r\n")
            assert await client.read(19) == b"HTTP/1.1 200 OK\r\n\r\n"


async def test_records_that_came_together_are_read_together_or_kept_for_the_next_read() -> None:
    async with connection() as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client)
            await client.sock.send(client.records(b"one,", b"two,", b"three"))
            assert await stream.receive_next() == b"one,two,three"
            # smaller reads than a record: the rest is read without waiting for an edge
            # the kernel will not give again (its bytes are out of the socket already)
            await client.sock.send(client.records(b"abcdefgh", b"ijkl"))
            got = [await stream.receive_next(3) for _ in range(4)]
            assert b"".join(got) == b"abcdefghijkl"


async def test_a_record_cut_in_two_is_waited_for() -> None:
    async with connection() as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client)
            record = client.records(b"the whole request")
            await client.sock.send(record[:10])
            got: list[bytes] = []

            async def read() -> None:
                got.append(await stream.receive_next())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                await trio.testing.wait_all_tasks_blocked()
                assert got == []  # half a record is no plaintext: it waits
                await client.sock.send(record[10:])
            assert got == [b"the whole request"]


async def test_a_megabyte_comes_through_whole_both_ways() -> None:
    body = bytes(range(256)) * 4096
    async with connection() as (stream, client, _):
        with trio.fail_after(30):
            await handshake(stream, client)
            async with trio.open_nursery() as nursery:

                async def upload() -> None:
                    client.tls.write(body)
                    await client.flush()

                nursery.start_soon(upload)
                received = b""
                while len(received) < len(body):
                    received += await stream.receive_next()
            assert received == body
            assert len(body) > PIECE  # sent in pieces
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, body)
                assert await client.read(len(body)) == body


async def test_close_notify_both_ways() -> None:
    async with connection() as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client)
            await stream.send_close_notify()
            assert await client.read(1) == b""  # a clean end, not an EOF
            client.tls.unwrap()  # the client answers with its own
            await client.flush()
            assert await stream.receive_some() == b""


async def test_an_eof_without_close_notify_is_an_end_too() -> None:
    async with connection() as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client)
            client.sock.shutdown(socket.SHUT_WR)
            assert await stream.receive_next() == b""


async def test_a_refused_client_gets_the_alert_that_says_why() -> None:
    async with connection(
        server_context(maximum=ssl.TLSVersion.TLSv1_2),
        client_context(minimum=ssl.TLSVersion.TLSv1_3),
    ) as (stream, client, _):
        with trio.fail_after(10):
            try:
                client.tls.do_handshake()
            except ssl.SSLWantReadError:
                await client.flush()
            with pytest.raises(ssl.SSLError):
                await stream.do_handshake()
            await stream.send_alert()
            await client.pull()
            with pytest.raises(ssl.SSLError, match="PROTOCOL_VERSION"):
                client.tls.do_handshake()


async def test_send_soon_hands_the_record_to_the_flusher() -> None:
    async with connection() as (stream, client, waiter):
        with trio.fail_after(10):
            await handshake(stream, client)
            assert stream.send_soon(b"HTTP/1.1 204 No Content\r\n\r\n")
            assert await client.read(27) == b"HTTP/1.1 204 No Content\r\n\r\n"
            # with no flusher it takes nothing, and encrypts nothing: the records that
            # follow still decrypt (no record was made and dropped)
            stream.transport_stream.waiter = None
            assert not stream.send_soon(b"lost?")
            await stream.send_all(b"next")
            assert await client.read(4) == b"next"
            assert waiter.open


async def test_interrupt_ends_the_wait_for_the_next_request() -> None:
    async with connection() as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client)
            assert not stream.interrupt()  # not waiting: nothing to end
            async with trio.open_nursery() as nursery:

                async def wait() -> None:
                    with pytest.raises(trio.ClosedResourceError):
                        await stream.receive_next()

                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                assert stream.interrupt()
            stream.resume()
            await stream.send_all(b"late")  # after resume the stream works again
            assert await client.read(4) == b"late"


async def test_a_send_cut_off_mid_record_sends_no_close_notify() -> None:
    async with connection() as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client)
            stream.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            with trio.move_on_after(0.2):  # the client reads nothing: the send stalls
                await stream.send_all(b"x" * (4 << 20))
            await stream.send_close_notify()  # nothing: it would land inside a record
            stream.close()
            with pytest.raises(EOFError):  # records, then one cut short, then the end
                await client.read(8 << 20)


async def test_tls_1_3_tickets_wait_for_the_first_answer_and_go_in_its_send() -> None:
    async with connection() as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client)
            with trio.move_on_after(0.2):  # nothing more comes: the tickets wait
                await client.pull()
                raise AssertionError("the server sent something before its first answer")
            await stream.send_all(b"answer")
            data = await client.sock.recv(65536)  # one send: tickets, then the answer
            client.incoming.write(data)
            assert await client.read(6) == b"answer"
            assert client.tls.session is not None and client.tls.session.has_ticket


async def test_tls_1_2_handshakes_at_once_since_its_client_waits_for_the_servers_finished() -> (
    None
):
    async with connection(server_context(maximum=ssl.TLSVersion.TLSv1_2)) as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client)  # would hang if the server held its Finished
            assert stream.ssl_object.version() == "TLSv1.2"
            await client.sock.send(client.records(b"ping"))
            assert await stream.receive_next() == b"ping"


async def test_the_last_answer_carries_the_close_notify() -> None:
    async with connection() as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client)
            await stream.send_final(b"bye")
            assert await client.read(100) == b"bye"  # then a clean end, not an EOF
            assert stream.close_notify_nowait()  # nothing left to send before the close
            with pytest.raises(trio.BrokenResourceError):
                await stream.send_all(b"after the end")


async def test_close_notify_goes_after_an_answer_the_flusher_still_holds() -> None:
    async with connection() as (stream, client, _):
        with trio.fail_after(10):
            await handshake(stream, client)
            assert stream.send_soon(b"held")  # the flusher writes it in the next pass
            assert not stream.close_notify_nowait()  # it cannot overtake the answer
            await stream.send_close_notify()
            assert await client.read(100) == b"held"
