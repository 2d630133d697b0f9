"""HTTPS as the worker serves it on its raw socket (``protocols.tlsstream``), in real worker
processes, with clients that choose their records: requests that share a segment, a head
that comes one byte per record, bodies of many records both ways, and the keep-alive,
answers and closes of many connections at once."""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trustme

from helpers import address_of, open_herd

# every test here runs with h11 and with httptools (conftest.http_parser)
pytestmark = pytest.mark.usefixtures("http_parser")

APP = "apps.http_edge_apps:app"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, ssl.SSLContext]]:
    directory = tmp_path_factory.mktemp("tls-stream-pki")
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    cert, key = directory / "cert.pem", directory / "key.pem"
    cert.write_bytes(b"".join(blob.bytes() for blob in server.cert_chain_pems))
    server.private_key_pem.write_to_path(key)
    context = ssl.create_default_context()
    ca.configure_trust(context)
    yield cert, key, context


class RecordClient:
    """A TLS client over a trio socket whose records go out when, and as, the test says."""

    def __init__(self, sock: trio.socket.SocketType, context: ssl.SSLContext) -> None:
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="127.0.0.1")
        self.plain = b""

    @classmethod
    async def connect(cls, port: int, context: ssl.SSLContext) -> RecordClient:
        sock = trio.socket.socket()
        await sock.connect(("127.0.0.1", port))
        client = cls(sock, context)
        while True:
            try:
                client.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await client.send_records()
                await client.pull()
        await client.send_records()
        return client

    async def send_records(self, *pieces: bytes) -> None:
        """Each piece in a record of its own, all of them in one send."""
        for piece in pieces:
            self.tls.write(piece)
        data = self.outgoing.read()
        while data:
            data = data[await self.sock.send(data) :]

    async def pull(self) -> bool:
        data = await self.sock.recv(1 << 20)
        if not data:
            return False
        self.incoming.write(data)
        return True

    async def response(self) -> tuple[bytes, bytes]:
        """The next response's head and body (known length)."""
        while b"\r\n\r\n" not in self.plain:
            await self.more()
        head, _, self.plain = self.plain.partition(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        while len(self.plain) < length:
            await self.more()
        body, self.plain = self.plain[:length], self.plain[length:]
        return head, body

    async def more(self) -> None:
        try:
            part = self.tls.read(1 << 20)
        except ssl.SSLWantReadError:
            if not await self.pull():
                raise EOFError("the server closed") from None
            return
        if not part:
            raise EOFError("close_notify")
        self.plain += part

    async def aclose(self) -> None:
        self.sock.close()


async def test_requests_in_one_segment_are_answered_in_order_on_one_connection(
    pki: tuple[Path, Path, ssl.SSLContext],
) -> None:
    cert, key, context = pki
    async with open_herd(app=APP, workers=1, certfile=str(cert), keyfile=str(key)) as herd:
        _, port = address_of(herd)
        with trio.fail_after(30):
            client = await RecordClient.connect(port, context)
            try:
                gets = [b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n" % n for n in range(5)]
                await client.send_records(b"".join(gets[:2]), *gets[2:])  # 4 records
                for n in range(5):
                    head, body = await client.response()
                    assert head.startswith(b"HTTP/1.1 200 "), head
                    assert body == b"GET /%d" % n
                # and the connection goes on
                await client.send_records(b"GET /again HTTP/1.1\r\nHost: t\r\n\r\n")
                assert (await client.response())[1] == b"GET /again"
            finally:
                await client.aclose()


async def test_a_head_that_comes_one_byte_per_record_is_answered(
    pki: tuple[Path, Path, ssl.SSLContext],
) -> None:
    cert, key, context = pki
    async with open_herd(app=APP, workers=1, certfile=str(cert), keyfile=str(key)) as herd:
        _, port = address_of(herd)
        with trio.fail_after(30):
            client = await RecordClient.connect(port, context)
            try:
                request = b"GET /slowly?x=1 HTTP/1.1\r\nHost: t\r\n\r\n"
                for index in range(len(request)):  # a record, and a segment, per byte
                    await client.send_records(request[index : index + 1])
                    if index % 8 == 0:
                        await trio.sleep(0.005)
                assert (await client.response())[1] == b"GET /slowly x=1"
                # one send, one record per byte: read as one head
                await client.send_records(*[bytes([byte]) for byte in request])
                assert (await client.response())[1] == b"GET /slowly x=1"
            finally:
                await client.aclose()


async def test_bodies_of_many_records_arrive_whole_both_ways(
    pki: tuple[Path, Path, ssl.SSLContext],
) -> None:
    cert, key, context = pki
    body = hashlib.sha256(b"seed").digest() * (6 * MIB // 32)
    async with open_herd(app=APP, workers=1, certfile=str(cert), keyfile=str(key)) as herd:
        _, port = address_of(herd)
        with trio.fail_after(60):
            client = await RecordClient.connect(port, context)
            try:
                head = b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
                async with trio.open_nursery() as nursery:

                    async def upload() -> None:
                        await client.send_records(head)
                        for start in range(0, len(body), 1 << 20):
                            await client.send_records(body[start : start + (1 << 20)])

                    nursery.start_soon(upload)
                    echoed = (await client.response())[1]
                assert hashlib.sha256(echoed).digest() == hashlib.sha256(body).digest()
                for path in (b"/big?mb=12", b"/big-stream?mb=12"):  # one send; pieces
                    await client.send_records(b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
                    got = await read_chunked_or_sized(client)
                    assert got == (b"x" if path == b"/big?mb=12" else b"y") * (12 * MIB)
            finally:
                await client.aclose()


async def read_chunked_or_sized(client: RecordClient) -> bytes:
    """The body of the next response, sized or chunked."""
    while b"\r\n\r\n" not in client.plain:
        await client.more()
    head, _, client.plain = client.plain.partition(b"\r\n\r\n")
    if b"content-length" in head.lower():
        client.plain = head + b"\r\n\r\n" + client.plain
        return (await client.response())[1]
    body = b""
    while True:
        while b"\r\n" not in client.plain:
            await client.more()
        line, _, client.plain = client.plain.partition(b"\r\n")
        size = int(line, 16)
        while len(client.plain) < size + 2:
            await client.more()
        body += client.plain[:size]
        client.plain = client.plain[size + 2 :]
        if not size:
            return body


async def test_many_keep_alive_connections_at_once(
    pki: tuple[Path, Path, ssl.SSLContext],
) -> None:
    cert, key, context = pki
    async with open_herd(app=APP, workers=2, certfile=str(cert), keyfile=str(key)) as herd:
        _, port = address_of(herd)
        answered: list[int] = []

        async def talk(n: int) -> None:
            client = await RecordClient.connect(port, context)
            try:
                for i in range(20):
                    await client.send_records(b"GET /%d/%d HTTP/1.1\r\nHost: t\r\n\r\n" % (n, i))
                    assert (await client.response())[1] == b"GET /%d/%d" % (n, i)
                answered.append(n)
            finally:
                await client.aclose()

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for n in range(40):
                    nursery.start_soon(talk, n)
        assert sorted(answered) == list(range(40))
