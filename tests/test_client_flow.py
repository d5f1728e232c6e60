"""The client library's reading flow control (chatproto.client.ClientProtocol): the
bytes of downloads waiting for the disk hold the socket past 4 MiB, and the
application's pause()/resume() never lifts that hold early.  StringTransport: its
``producerState`` says whether the client reads its socket."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from chatproto.client import ClientProtocol, _Receiver

MiB = 1024 * 1024


def _client(tmp_path: Any) -> tuple[ClientProtocol, StringTransport, list[Deferred[Any]]]:
    """A client whose disk writes wait until the test fires them (in order)."""
    proto = ClientProtocol(Clock())
    writes: list[Deferred[Any]] = []

    def run(fn: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        d.addCallback(lambda _: fn(*args))
        writes.append(d)
        return d

    proto.run = run  # type: ignore[method-assign]
    transport = StringTransport()
    proto.makeConnection(transport)
    return proto, transport, writes


def test_a_resume_leaves_the_socket_held_while_downloaded_bytes_wait_for_the_disk(
    tmp_path: Any,
) -> None:
    proto, transport, writes = _client(tmp_path)
    receiver = _Receiver(proto, 1, str(tmp_path / "f.part"), 0, 8 * MiB, None, 8 * MiB)
    receiver.data(0, b"x" * (5 * MiB))  # 5 MiB waiting for the disk: the socket is held
    assert transport.producerState == "paused"
    proto.pause()
    proto.resume()  # (it read the socket again, bytes still waiting: no bound any more)
    assert transport.producerState == "paused"
    writes.pop(0).callback(None)  # written: the hold ends
    assert transport.producerState == "producing"


def test_the_disk_catching_up_does_not_resume_a_paused_client(tmp_path: Any) -> None:
    proto, transport, writes = _client(tmp_path)
    receiver = _Receiver(proto, 1, str(tmp_path / "f.part"), 0, 8 * MiB, None, 8 * MiB)
    receiver.data(0, b"x" * (5 * MiB))
    proto.pause()
    writes.pop(0).callback(None)
    assert transport.producerState == "paused"  # the application's pause stands
    proto.resume()
    assert transport.producerState == "producing"
