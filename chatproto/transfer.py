"""Moving file bytes between disk and connections, with flow control, off the reactor.

Shared by the realm (:mod:`chatproto.files`, :mod:`chatproto.protocol`) and the client
library (:mod:`chatproto.client`), which move bytes the same two ways:

- :class:`RangeProducer` reads a byte range of a file in a thread and feeds it to any
  Twisted ``IConsumer`` (a transport, a ``twisted.web`` request, a :class:`DataSink`)
  as an ``IPushProducer``: it stops reading while the consumer is paused, so a slow
  reader never makes the process hold more than one block of the file.
- :class:`SerialWriter` appends bytes to a file in a thread, coalescing what arrives
  while a write is in flight into the next write, and keeps a running sha256.
- :class:`DataSink` is the consumer that cuts bytes into binary data frames
  (:func:`chatproto.wire.encode_data`) for one transfer on one connection.

Disk work goes through a *runner* ``run(fn, *args) -> Deferred``: :class:`ThreadRunner`
(a small thread pool) in a process, :func:`inline` in tests driven by ``task.Clock``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IConsumer, IPushProducer
from twisted.internet.threads import deferToThreadPool
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from chatproto import wire

__all__ = [
    "BLOCK",
    "DataSink",
    "RangeProducer",
    "Runner",
    "SerialWriter",
    "ThreadRunner",
    "hash_file",
    "inline",
]

#: Bytes read from disk per thread call (one such block is prefetched while paused).
BLOCK = 256 * 1024
_pack = struct.Struct("!I").pack


class Runner(Protocol):
    def __call__(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]: ...


def inline(fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Run ``fn`` at once on the calling thread (tests with ``task.Clock`` only)."""
    return maybeDeferred(fn, *args)


class ThreadRunner:
    """Runs disk work on its own small thread pool, started on first use (so that a
    process which fails to start is not kept alive by idle threads)."""

    def __init__(self, reactor: Any, name: str = "chatproto-files", threads: int = 2) -> None:
        self._reactor = reactor
        self._pool = ThreadPool(1, threads, name)
        self._started = False

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Deferred[Any]:
        if not self._started:
            self._started = True
            self._pool.start()
        return deferToThreadPool(self._reactor, self._pool, fn, *args)

    def stop(self) -> None:
        if self._started:
            self._started = False
            self._pool.stop()


def hash_file(path: str, length: int | None = None) -> Any:
    """A sha256 object fed with the first ``length`` bytes of ``path`` (all: None).
    Blocking: run it through a runner."""
    h = hashlib.sha256()
    left = length
    with open(path, "rb") as f:
        while left is None or left > 0:
            block = f.read(BLOCK * 4 if left is None else min(BLOCK * 4, left))
            if not block:
                break
            h.update(block)
            if left is not None:
                left -= len(block)
    if left:
        raise OSError(f"{path} is shorter than expected ({left} bytes missing)")
    return h


@implementer(IPushProducer)
class RangeProducer:
    """Feeds ``length`` bytes of ``path`` from ``offset`` to a consumer.

    :meth:`start` registers itself as a streaming producer on the consumer and fires
    with the number of bytes written once all are (the consumer is unregistered
    then); it fails if the file cannot be read or is shorter than promised, with
    ``ConnectionDone`` if the consumer stops it, and with the reason given to
    :meth:`stop`.  Cancelling that Deferred stops it.
    """

    def __init__(
        self,
        run: Runner,
        path: str,
        offset: int,
        length: int,
        block: int = BLOCK,
        fd: int | None = None,
    ) -> None:
        """``fd``: ``path`` opened already (for reading); the producer closes it when
        it ends.  Else ``path`` is opened at the first read."""
        self._run = run
        self.path = path
        self.offset = offset
        self.length = length
        self.block = block
        self.sent = 0
        self._next = offset
        self._ready: bytes | None = None
        self._reading = False
        self._paused = False
        self._stopped = False
        self._pumping = False
        self._fd: int | None = fd
        self._consumer: Any = None
        self.done: Deferred[int] = Deferred(lambda _: self.stopProducing())

    def start(self, consumer: IConsumer) -> Deferred[int]:
        self._consumer = consumer
        consumer.registerProducer(self, True)
        self._pump()
        return self.done

    # IPushProducer ------------------------------------------------------------------

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self.stop(ConnectionDone("the consumer stopped the transfer"))

    def stop(self, reason: BaseException) -> None:
        """Stop from the source's side (the bytes may not be sent any more: their file
        was deleted): nothing more is read or written, and :attr:`done` fails with
        ``reason``.  A block being read in a thread meanwhile is dropped."""
        if not self._stopped:
            self._end(Failure(reason))

    def refused(self) -> None:
        """:meth:`start` raised (the consumer refused to register it): nothing was
        read; close the file if it was handed in open."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # internals ----------------------------------------------------------------------

    def _read(self, start: int, n: int) -> bytes:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        return os.pread(self._fd, n, start)

    def _pump(self) -> None:
        if self._pumping:
            return
        self._pumping = True
        try:
            while not self._stopped:
                if self._ready is not None and not self._paused:
                    data, self._ready = self._ready, None
                    self.sent += len(data)
                    self._consumer.write(data)  # may pause us, synchronously
                    continue
                end = self.offset + self.length
                if self._ready is None and not self._reading and self._next < end:
                    n = min(self.block, end - self._next)
                    start, self._next = self._next, self._next + n
                    self._reading = True
                    d = self._run(self._read, start, n)
                    d.addCallbacks(self._got, self._failed, callbackArgs=(n,))
                    continue  # an inline runner has filled _ready already
                break
        finally:
            self._pumping = False
        if not self._stopped and self.sent >= self.length:
            self._end(None)

    def _got(self, data: bytes, n: int) -> None:
        self._reading = False
        if self._stopped:
            return
        if len(data) != n:
            self._end(Failure(OSError(f"{self.path} ended {n - len(data)} bytes early")))
            return
        self._ready = data
        self._pump()

    def _failed(self, f: Failure) -> None:
        self._reading = False
        if not self._stopped:
            self._end(f)

    def _end(self, failure: Failure | None) -> None:
        self._stopped = True
        self._ready = None
        if self._fd is not None:
            fd, self._fd = self._fd, None
            if self._reading:  # the thread still uses it: close when it is done
                self._run(lambda: None).addBoth(lambda _: os.close(fd))
            else:
                os.close(fd)
        if self._consumer is not None:
            self._consumer.unregisterProducer()
        if not self.done.called:
            if failure is None:
                self.done.callback(self.sent)
            else:
                self.done.errback(failure)


class ConnectionDone(Exception):
    """The consumer went away before the transfer was complete."""


class SerialWriter:
    """Appends to ``path`` from ``offset`` in a thread, in order, with a running sha256.

    :meth:`write` queues bytes and fires with the file's length once they are written
    (not fsynced).  Bytes queued while a write is in flight go out together in the
    next write.  After a failed write every queued write fails and :attr:`failed`
    holds the failure; :attr:`offset` is what is on disk.  The hash of a file resumed
    at ``offset > 0`` is rebuilt from the bytes already there on the first write.
    """

    def __init__(self, run: Runner, path: str, offset: int = 0) -> None:
        self._run = run
        self.path = path
        #: Bytes on disk (as of the last completed write).
        self.offset = offset
        #: Bytes queued and not written yet.
        self.pending = 0
        self.failed: Failure | None = None
        self._queue: list[tuple[bytes, Deferred[int]]] = []
        self._writing = False
        self._idle: list[Deferred[None]] = []
        self._hash: Any = None
        self._hashed = 0

    def write(self, data: bytes) -> Deferred[int]:
        d: Deferred[int] = Deferred()
        self._queue.append((data, d))
        self.pending += len(data)
        self._pump()
        return d

    def drained(self) -> Deferred[None]:
        """Fires when nothing is queued or being written."""
        d: Deferred[None] = Deferred()
        if self._writing or self._queue:
            self._idle.append(d)
        else:
            d.callback(None)
        return d

    def digest(self) -> Deferred[str]:
        """The hex sha256 of the file's first :attr:`offset` bytes (call when drained)."""
        if self._hash is not None and self._hashed == self.offset:
            return succeed(str(self._hash.hexdigest()))
        return self._run(self._rehash_all)

    def _rehash_all(self) -> str:
        self._hash = hash_file(self.path, self.offset) if self.offset else hashlib.sha256()
        self._hashed = self.offset
        return str(self._hash.hexdigest())

    def _write_sync(self, start: int, data: bytes) -> int:
        if self._hash is None or self._hashed != start:
            self._hash = hash_file(self.path, start) if start else hashlib.sha256()
            self._hashed = start
        parent = os.path.dirname(self.path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            view = memoryview(data)
            pos = start
            while view:
                n = os.pwrite(fd, view, pos)
                view = view[n:]
                pos += n
        finally:
            os.close(fd)
        self._hash.update(data)
        self._hashed = start + len(data)
        return self._hashed

    def _pump(self) -> None:
        if self._writing or not self._queue:
            return
        if self.failed is not None:
            queue, self._queue = self._queue, []
            self.pending = 0
            for _, d in queue:
                d.errback(self.failed)
            self._wake()
            return
        batch, self._queue = self._queue, []
        data = batch[0][0] if len(batch) == 1 else b"".join(b for b, _ in batch)
        self._writing = True

        def done(end: int) -> None:
            self.offset = end
            for _, d in batch:
                d.callback(end)

        def failed(f: Failure) -> None:
            self.failed = f
            for _, d in batch:
                d.errback(f)

        def next_(_: object) -> None:
            self._writing = False
            self.pending -= len(data)
            if self._queue:
                self._pump()
            else:
                self._wake()

        d = self._run(self._write_sync, self.offset, data)
        d.addCallbacks(done, failed).addBoth(next_)

    def _wake(self) -> None:
        idle, self._idle = self._idle, []
        for d in idle:
            d.callback(None)


@implementer(IConsumer)
class DataSink:
    """An ``IConsumer`` that frames the bytes of one transfer as binary data frames.

    ``emit`` writes bytes to the connection (the protocol's output path, which keeps
    frame order and slow-reader accounting); frames carry ``op``, ``stream`` and the
    absolute offset, and at most ``chunk`` data bytes each.  The connection forwards
    its own pause/resume to :attr:`producer`.
    """

    def __init__(
        self, emit: Callable[[bytes], None], op: int, stream: int, offset: int, chunk: int
    ) -> None:
        self._emit = emit
        self.op = op
        self.stream = stream
        self.offset = offset
        self.chunk = chunk
        self.producer: Any = None
        self.paused = False

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        if self.paused:
            producer.pauseProducing()

    def unregisterProducer(self) -> None:
        self.producer = None

    def pause(self) -> None:
        self.paused = True
        if self.producer is not None:
            self.producer.pauseProducing()

    def resume(self) -> None:
        self.paused = False
        if self.producer is not None:
            self.producer.resumeProducing()

    def stop(self) -> None:
        if self.producer is not None:
            self.producer.stopProducing()

    def write(self, data: bytes) -> None:
        parts: list[bytes | memoryview] = []
        pack = wire.DATA_HEADER.pack
        header = wire.DATA_HEADER.size
        view = memoryview(data)
        for i in range(0, len(data), self.chunk):
            piece = view[i : i + self.chunk]
            parts.append(_pack(header + len(piece)))
            parts.append(pack(wire.FRAME_BINARY, self.op, self.stream, self.offset + i))
            parts.append(piece)
        self.offset += len(data)
        self._emit(b"".join(parts))
