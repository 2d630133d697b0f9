"""A connection's phase deadlines around a send that stalls (``HTTPConnection.send_stalled``
and ``send_resumed``), in process with trio's autojump clock: a stall gives the client
``send_timeout``; after it the connection goes back to the phase it stalled in. A small
answer handed to the worker's flusher stalls while its connection already waits for the
next request (IDLE): that wait then begins anew, with the whole keep-alive timeout."""

from __future__ import annotations

import math
import socket
from collections.abc import AsyncIterator

import pytest
import trio

from trioherd._config import Config
from trioherd.protocols.http1 import HTTPConnection
from trioherd.protocols.rawstream import RawSocketStream
from trioherd.protocols.shared import APP, IDLE, SEND
from trioherd.protocols.state import ServerState

pytestmark = pytest.mark.trio


@pytest.fixture
async def connection() -> AsyncIterator[HTTPConnection]:
    ours, theirs = socket.socketpair()
    state = ServerState(Config(keep_alive_timeout=5.0, send_timeout=2.0))
    stream = RawSocketStream(ours)
    yield HTTPConnection(state, None, stream, None)  # type: ignore[arg-type]  # no app here
    stream.close()
    theirs.close()


async def test_a_stall_while_waiting_for_a_request_goes_back_to_a_fresh_wait(
    connection: HTTPConnection, autojump_clock: trio.testing.MockClock
) -> None:
    connection.phase = IDLE
    connection.deadline = trio.current_time() + 5.0
    await trio.sleep(3)
    connection.send_stalled()
    assert connection.phase == SEND
    assert connection.deadline == trio.current_time() + 2.0  # the send timeout
    await trio.sleep(1)
    connection.send_stalled()  # the client took some: the send timeout starts again
    assert connection.deadline == trio.current_time() + 2.0
    await trio.sleep(1)
    connection.send_resumed()
    assert connection.phase == IDLE
    assert connection.deadline == trio.current_time() + 5.0  # the whole keep-alive, anew


async def test_a_stall_of_an_answer_goes_back_to_the_app_without_a_deadline(
    connection: HTTPConnection, autojump_clock: trio.testing.MockClock
) -> None:
    connection.phase = APP
    connection.deadline = math.inf
    connection.send_stalled()
    assert connection.phase == SEND
    connection.send_resumed()
    assert (connection.phase, connection.deadline) == (APP, math.inf)


async def test_during_a_drain_the_fresh_wait_is_the_drain_grace(
    connection: HTTPConnection, autojump_clock: trio.testing.MockClock
) -> None:
    connection.state.draining = True
    connection.phase = IDLE
    connection.send_stalled()
    connection.send_resumed()
    assert connection.deadline == trio.current_time() + connection.state.drain_grace
