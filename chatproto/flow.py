"""Output flow control of client connections: the slow-reader bound.

Every connection that delivers to a client (the native protocol, its WebSocket form,
the IRC gateway) registers itself as a *streaming producer* on its transport.  Twisted
then calls ``pauseProducing`` when the transport's buffer passes its ``bufferSize``
(64 KiB for TCP: the peer is not reading fast enough) -- on **every** write while the
buffer stays that full -- and ``resumeProducing`` once the buffer has drained
completely.

:class:`OutputQueue` is what such a connection writes through.  While the transport is
not paused, bytes go straight to it.  While it is paused, they are kept here, whole
and in order, and written when it resumes, only as long as the transport takes them
without pausing again.  So what a connection holds for a peer that does not read is
exactly :attr:`OutputQueue.held` (plus one ``bufferSize`` in the transport), and the
owner drops the connection when :meth:`OutputQueue.write` says it passed ``limit``
(``limits.max_output_buffer``).  Counting bytes written "since the pause" instead is
wrong twice: Twisted's repeated ``pauseProducing`` calls would restart the count on
every write, and a reader that keeps up with a steady flow but never empties the
buffer would be counted as if it read nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Any

__all__ = ["BURST_WRITE", "OutputQueue"]

#: The frames held during a delivery burst are written once the burst's items may come
#: to this many bytes for one connection, without waiting for its end
#: (chatproto.realm.sessions.Sessions.route): one write stays about the size of a
#: transport's own buffer, so a reader that stopped reading is held to the output bound
#: plus about this much (see OutputQueue).
BURST_WRITE = 64 * 1024


class OutputQueue:
    """Writes to ``transport``, holding what it cannot take while paused.

    The owner forwards its ``pauseProducing``/``resumeProducing`` here
    (:meth:`pause`, :meth:`resume`).  :attr:`blocked` is true while writes are held
    (the transport is paused, or held bytes are still waiting for it): a hot path
    may write to the transport itself only while it is false.
    """

    __slots__ = ("_queue", "blocked", "closed", "held", "limit", "paused", "transport")

    def __init__(self, transport: Any, limit: int) -> None:
        self.transport = transport
        #: Bytes held beyond which the peer is a slow reader.
        self.limit = limit
        #: The transport asked us to stop writing.
        self.paused = False
        #: Writes are held (paused, or older bytes still held).
        self.blocked = False
        #: Bytes held, not yet given to the transport.
        self.held = 0
        #: :meth:`close` was called: later writes are discarded.
        self.closed = False
        self._queue: deque[bytes] = deque()

    def write(self, data: bytes) -> bool:
        """Write ``data`` or hold it; False when the bytes held now exceed ``limit``
        (the caller drops the connection: see :meth:`drop`)."""
        if not self.blocked:
            self.transport.write(data)  # may pause us, synchronously
            return True
        if self.closed:
            return True
        self._queue.append(data)
        self.held += len(data)
        return self.held <= self.limit

    def pause(self) -> None:
        self.paused = self.blocked = True

    def resume(self) -> bool:
        """The transport has drained: give it held bytes until it pauses us again.
        True when nothing is held any more (the connection can take more output)."""
        self.paused = False
        if self.closed:
            return False
        queue = self._queue
        while queue and not self.paused:
            data = queue.popleft()
            self.held -= len(data)
            self.transport.write(data)  # may call pause() before returning
        self.blocked = self.paused or bool(queue)
        return not self.blocked

    def close(self, last: bytes = b"") -> None:
        """Before a polite close: everything held, then ``last``, to the transport
        (which writes it out before it closes, or is aborted by the keepalive sweep).
        Writes that follow go nowhere."""
        queue, self._queue = self._queue, deque()
        data = b"".join(queue) + last
        self.held = 0
        self.blocked = self.closed = True
        if data:
            self.transport.write(data)

    def drop(self) -> None:
        """Forget everything held (a slow reader is being dropped)."""
        self._queue.clear()
        self.held = 0
