"""Sans-IO bookkeeping of the connections on their way to one worker, and the rules that
say when a worker falls behind.

Nothing here touches a socket or a clock: the hand-off (``primary.handoff``) passes the time and
what it read from the worker's tally, and does the I/O the answers call for. So the
back-pressure rules are tested synchronously (tests/unit/test_transit.py).

The rules, from the mildest:

- **Window.** A worker holds at most :data:`WINDOW` connections unacknowledged. A worker
  whose window is full simply gets none until it acknowledges some: the dispatcher skips
  it (``_policy``); nothing is taken back. A busy worker so receives at the rate it
  acknowledges, and when every window is full the primary stops accepting, so that new
  clients wait in the kernel's accept queue, not in the primary's hands.
- **Paused.** A worker that has left a batch unacknowledged for :data:`PAUSE_AFTER` gets no
  new connection until it acknowledges one; what it has queued stays queued. This keeps a
  worker whose loop just blocked from collecting a window of connections that it will not
  take in time, without taking anything from a worker that is merely slow.
- **Stalled.** A worker that has acknowledged nothing for :data:`ACK_DEADLINE` while a batch
  waits for it is not making progress at all: its queue is taken back and given to other
  workers. It is readmitted as soon as it is heard from again: an acknowledgement, a
  connection it opened or closed (its tally moved), or a heartbeat.

Progress, not the age of a batch, is what counts: a worker working through a deep queue
acknowledges as it goes and is never stalled.
"""

from __future__ import annotations

import collections
import enum

import attrs

WINDOW = 4096
"""Connections one worker may hold unacknowledged before it gets no more (not a
congestion: it gets more as soon as it acknowledges). As large as the kernel's usual
accept queue (``net.core.somaxconn``, 4096): a worker that keeps acknowledging can take a
whole queue, as it would accepting for itself (``--dispatch shared``), instead of leaving
it full so that new clients' SYNs are dropped and retried 1 or 3 s later (10,000
connections at once, the last answered after 0.6-2.2 s with a window of 256, 0.5-0.7 s
with this one; docs/reliability.md). A hung worker still collects little: it is paused
after PAUSE_AFTER."""
PAUSE_AFTER = 0.02
"""Seconds a batch may wait unacknowledged before its worker gets no new connection until
it acknowledges one."""
ACK_DEADLINE = 0.25
"""Seconds without any acknowledgement, while a batch waits, after which a worker counts
as stalled and its queue is taken back."""


class Skip(enum.Enum):
    """Why a worker that is otherwise ready gets no new connection for now."""

    PAUSED = "paused"
    """Slow to acknowledge: back in dispatch at its next acknowledgement."""
    STALLED = "stalled"
    """No progress: its queue was taken back; back in dispatch once heard from."""


@attrs.frozen
class Batch:
    """Connections passed in one packet, kept by the primary until acknowledged."""

    seq: int
    listener: int
    fds: list[int]
    sent_at: float


@attrs.define(eq=False)
class Transit:
    """One worker's batches in flight (sent, not acknowledged yet; oldest first), and
    whether it is skipped for falling behind."""

    batches: collections.deque[Batch] = attrs.Factory(collections.deque)
    next_seq: int = 1
    progress_at: float = 0.0
    """When the worker last showed progress (an acknowledgement, or being admitted)."""
    skip: Skip | None = None
    activity: tuple[int, int] = (0, 0)
    """The worker's (opened, closed) counts when it was found stalled."""
    finished: bool = False
    """The end marker is queued: no more batches."""

    def sent(self, listener: int, fds: list[int], now: float) -> int:
        """Record a batch passed now; its sequence number."""
        seq = self.next_seq
        self.next_seq = seq + 1
        if not self.batches:  # the wait for an acknowledgement starts with this batch
            self.progress_at = now
        self.batches.append(Batch(seq, listener, fds, now))
        return seq

    def acknowledge(self, taken: int, now: float) -> list[Batch]:
        """The worker marked every batch up to ``taken`` as its own: those batches (the
        caller closes its copies). Any acknowledgement is progress."""
        batches = self.batches
        done: list[Batch] = []
        while batches and batches[0].seq <= taken:
            done.append(batches.popleft())
        if done:
            self.progress_at = now
        return done

    def waited(self, now: float) -> float:
        """Seconds the worker has let its oldest batch wait without any progress (0 with
        nothing in flight)."""
        if not self.batches:
            return 0.0
        return now - self.progress_at

    def verdict(self, now: float) -> Skip | None:
        """What the worker's progress calls for now: STALLED past ACK_DEADLINE, PAUSED
        past PAUSE_AFTER, else None. It never eases a skip: only progress does."""
        waited = self.waited(now)
        if waited > ACK_DEADLINE:
            return Skip.STALLED
        if waited > PAUSE_AFTER:
            return Skip.PAUSED
        return None

    def take_back(self, seqs: set[int]) -> list[Batch]:
        """Remove the batches whose packets were recalled from the worker's channel."""
        if not seqs:
            return []
        back = [batch for batch in self.batches if batch.seq in seqs]
        self.batches = collections.deque(b for b in self.batches if b.seq not in seqs)
        return back

    def take_all(self) -> list[Batch]:
        """Every batch still in flight (the worker is gone or disowned)."""
        batches = list(self.batches)
        self.batches.clear()
        return batches
