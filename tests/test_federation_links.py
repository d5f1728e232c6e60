"""Links over real mutual TLS on loopback: normal events log plain lines, and a link
with nothing to send idles (no connection, no DNS lookup) until something is
queued for its realm or presence needs it."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor

from chatproto.client import connect
from tests.conftest import until
from tests.fedharness import LogCapture
from tests.test_federation_loopback import raw_peer, realms  # noqa: F401 (fixture)

PW = "password-1"


@pytest.fixture
def logs() -> Any:
    capture = LogCapture()
    yield capture
    capture.close()


def no_tracebacks(logs: LogCapture) -> None:
    bad = [line for line in logs.lines if "Traceback" in line or "Unhandled" in line]
    assert not bad, "\n".join(bad[:3])


@pytest_twisted.inlineCallbacks
def test_a_link_lost_during_a_file_fetch_is_one_plain_line(
    realms: Any,  # noqa: F811
    logs: Any,
) -> Any:
    """b fetches the bytes of a file item a.example sent; the link goes before they
    come.  The transaction is not acknowledged (a sends it again) and b's log says so
    in one line, without a traceback."""
    a, b = yield realms(["a.example", "b.example"])
    bob = yield connect(_reactor, b.addr, "bob", PW, register=True)
    yield bob.close()
    cert = {"cert": a.cfg.federation.certificate, "key": a.cfg.federation.private_key}
    peer = yield raw_peer(b, "a.example", cert, a.cfg.federation.ca)
    peer.send({"type": "hello", "version": 1, "realm": "a.example"})
    data = b"some bytes"
    meta = {
        "file_id": "F" * 20,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        "name": "notes.txt",
        "media_type": "text/plain",
    }
    item = {
        "id": "file-1",
        "kind": "file",
        "from": "alice@a.example",
        "to": "bob@b.example",
        "ts": 1764093000.0,
        "body": "notes.txt",
        "meta": meta,
    }
    peer.send({"type": "txn", "id": "1-1", "items": [item]})
    yield until(lambda: any(f["type"] == "fetch" for f in peer.frames), timeout=30)
    peer.sendString(b"\x00" + data[:4])  # some of the bytes, then the link goes
    peer.transport.abortConnection()
    yield until(lambda: logs.has("lost while storing txn 1-1"), timeout=30)
    assert logs.has("it will be sent again")
    assert not [f for f in peer.frames if f["type"] == "ack"]
    no_tracebacks(logs)
