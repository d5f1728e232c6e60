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

**Direct writes** (plain TCP transports, issue 20).  ``transport.write`` always
buffers and registers the socket for writing (an ``epoll_ctl``); the reactor's next
poll reports it writable, ``doWrite`` sends, and ``stopWriting`` is another
``epoll_ctl``.  When the transport is a plain TCP one (:func:`writes_directly`) and
Twisted holds none of our bytes, :class:`OutputQueue` sends them itself with the
transport's public ``writeSomeData`` instead: no registration, and one ``send`` for
all the bytes the connection is written in one reactor iteration (:class:`_Flusher`:
a connection answered and delivered to in the same iteration sends once, as with
Twisted's buffer; sending at each write cost as much CPU, and more latency).  What
the socket does not take is handed to ``transport.write`` (Twisted buffers it and
writes it out its usual way); from then on, until Twisted says it drained, writes are
held here exactly as while paused, and the first thing written after the drain is
everything held, in one ``send``.  Twisted says so through its public producer
contract: on such a transport the connection registers as a *pull* producer
(:meth:`OutputQueue.register`), whose ``resumeProducing`` Twisted calls every time
its buffer has drained (a streaming producer is told only when it had been paused).
Twisted never pauses a pull producer: the queue pauses its owner itself when it hands
Twisted a remainder (it calls the owner's ``pauseProducing``, as Twisted would), so
downloads and ``wait_writable`` wait for the drain as before.
What a non-reading peer costs is then :attr:`OutputQueue.held` plus one write's
remainder in the transport.  TLS transports (their bytes go through the TLS
connection: they cannot be written to directly), the WebSocket gateway's
``FrameTransport`` and test transports keep the streaming path above.
"""

from __future__ import annotations

import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import ISSLTransport, ITCPTransport
from twisted.logger import Logger

__all__ = ["BURST_WRITE", "OutputQueue", "writes_directly"]

_log = Logger()

#: The frames held during a delivery burst are written once the burst's items may come
#: to this many bytes for one connection, without waiting for its end
#: (chatproto.realm.sessions.Sessions.route): one write stays about the size of a
#: transport's own buffer, so a reader that stopped reading is held to the output bound
#: plus about this much (see OutputQueue).
BURST_WRITE = 64 * 1024


def writes_directly(transport: Any) -> bool:
    """``transport`` is a plain TCP connection whose socket :class:`OutputQueue` may
    write to itself (``writeSomeData``): it provides ``ITCPTransport``, not
    ``ISSLTransport``, and its class (not a wrapper forwarding attributes) has
    ``writeSomeData``.  A ``ProtocolWrapper`` such as Twisted's TLS protocol copies
    its transport's interfaces but has no ``writeSomeData`` of its own."""
    return (
        transport is not None
        and ITCPTransport.providedBy(transport)
        and not ISSLTransport.providedBy(transport)
        and not getattr(transport, "TLS", False)  # (tcp.Connection after startTLS)
        and callable(getattr(type(transport), "writeSomeData", None))
    )


class _Flusher:
    """Writes the bytes that direct :class:`OutputQueue` s took during one reactor
    iteration, one ``send`` per connection, from a ``callLater(0)``: it runs in the
    reactor's next ``runUntilCurrent``, right after the events of the poll that wrote
    them (or in the same one, for writes from thread callbacks), before it polls
    again.  Several writes to one connection in an iteration (a result and an echo,
    a JOIN's lines) so stay one ``send``, as with Twisted's own buffer."""

    __slots__ = ("call", "clock", "queues")

    def __init__(self, clock: Any) -> None:
        self.clock = clock
        self.queues: list[OutputQueue] = []
        self.call: Any = None

    def add(self, queue: OutputQueue) -> None:
        self.queues.append(queue)
        if self.call is None:
            self.call = self.clock.callLater(0, self.run)

    def run(self) -> None:
        self.call = None
        queues, self.queues = self.queues, []
        for queue in queues:
            try:
                queue.flush()
            except Exception:  # (one connection's failure leaves the others' bytes)
                _log.failure("writing to {transport}", transport=queue.transport)


_flushers: weakref.WeakKeyDictionary[Any, _Flusher] = weakref.WeakKeyDictionary()


def _flusher(clock: Any) -> _Flusher:
    flusher = _flushers.get(clock)
    if flusher is None:
        flusher = _flushers[clock] = _Flusher(clock)
    return flusher


class OutputQueue:
    """Writes to ``transport``, holding what it cannot take while paused.

    The owner (``producer``: the connection) forwards its
    ``pauseProducing``/``resumeProducing`` here (:meth:`pause`, :meth:`resume`) and
    registers itself with :meth:`register`.  :attr:`blocked` is true while writes are
    held (the transport is paused, or held bytes are still waiting for it): a hot path
    may write without holding (:meth:`put`) only while it is false.  With
    :attr:`direct`, :meth:`put` collects the iteration's bytes and sends them on the
    socket itself once the iteration's events are handled (see the module's
    docstring).  ``clock``: the reactor of those sends (the global one if None).
    """

    __slots__ = (
        "_flusher",
        "_pending",
        "_queue",
        "blocked",
        "closed",
        "direct",
        "held",
        "limit",
        "paused",
        "producer",
        "put",
        "transport",
    )

    def __init__(self, transport: Any, limit: int, producer: Any = None, clock: Any = None) -> None:
        self.transport = transport
        #: Bytes held beyond which the peer is a slow reader.
        self.limit = limit
        #: The connection whose pauseProducing/resumeProducing drive this queue.
        self.producer = producer
        #: The transport asked us to stop writing (or, writing directly, holds bytes
        #: of ours: it has not said it drained them yet).
        self.paused = False
        #: Writes are held (paused, or older bytes still held).
        self.blocked = False
        #: Bytes held, not yet given to the transport.
        self.held = 0
        #: :meth:`close` was called: later writes are discarded.
        self.closed = False
        #: Writes go on the socket directly while the transport holds none of ours.
        self.direct = producer is not None and writes_directly(transport)
        #: Write ``data`` now, as long as :attr:`blocked` is false: the transport's
        #: ``write``, or with :attr:`direct` this iteration's bytes (:meth:`flush`).
        self.put: Callable[[bytes], None] = self._collect if self.direct else self._give
        #: (direct) Bytes written in this iteration, not sent yet.
        self._pending: list[bytes] | None = None
        self._flusher: _Flusher | None = None
        if self.direct:
            if clock is None:
                from twisted.internet import reactor as clock
            self._flusher = _flusher(clock)
        self._queue: deque[bytes] = deque()

    def register(self) -> None:
        """Register the owner as the transport's producer: a streaming one (Twisted
        pauses and resumes it), or with :attr:`direct` a pull one (Twisted calls its
        ``resumeProducing`` each time its buffer has drained)."""
        self.transport.registerProducer(self.producer, not self.direct)

    def write(self, data: bytes) -> bool:
        """Write ``data`` or hold it; False when the bytes held now exceed ``limit``
        (the caller drops the connection: see :meth:`drop`)."""
        if not self.blocked:
            self.put(data)  # may pause us, synchronously
            return True
        if self.closed:
            return True
        self._queue.append(data)
        self.held += len(data)
        return self.held <= self.limit

    def _give(self, data: bytes) -> None:
        """:meth:`put` of a queue that does not write directly."""
        self.transport.write(data)

    def _collect(self, data: bytes) -> None:
        """:meth:`put` of a direct queue: sent at the iteration's :meth:`flush`."""
        pending = self._pending
        if pending is None:
            self._pending = [data]
            assert self._flusher is not None
            self._flusher.add(self)
        else:
            pending.append(data)

    def flush(self) -> None:
        """(direct) Send the bytes written in this iteration (:class:`_Flusher`)."""
        pending, self._pending = self._pending, None
        if not pending or self.closed:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        if self.blocked:  # paused since (the connection is being lost): first in line
            self._queue.appendleft(data)
            self.held += len(data)
            return
        self._send(data)

    def _send(self, data: bytes) -> None:
        """:meth:`put` of a direct queue: as much of ``data`` as the socket takes, the
        rest to the transport, and hold what follows until it has drained."""
        t = self.transport
        if t.disconnecting or not t.connected:
            t.write(data)  # (closing or closed: Twisted's business)
            return
        n = t.writeSomeData(data)
        if n == len(data):
            return
        if isinstance(n, int):
            data = data[n:]
        # (else the connection is lost: Twisted's write path notices it its usual way)
        t.write(data)
        if not self.paused:
            self.producer.pauseProducing()  # what Twisted does with a full buffer

    def pause(self) -> None:
        self.paused = self.blocked = True

    def resume(self) -> bool:
        """The transport has drained: give it held bytes until it pauses us again.
        True when nothing is held any more (the connection can take more output)."""
        self.paused = False
        if self.closed:
            return False
        queue = self._queue
        if self.direct:
            # Twisted holds none of ours: everything held, in one send.
            self.blocked = False
            if queue:
                data = b"".join(queue)
                queue.clear()
                self.held = 0
                self._send(data)  # may pause us again
            return not self.blocked
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
        pending, self._pending = self._pending, None
        if pending:  # (direct: not sent yet, and older than what is held)
            queue.extendleft(reversed(pending))
        data = b"".join(queue) + last
        self.held = 0
        self.blocked = self.closed = True
        if data:
            self.transport.write(data)

    def drop(self) -> None:
        """Forget everything held (a slow reader is being dropped)."""
        self._pending = None
        self._queue.clear()
        self.held = 0
