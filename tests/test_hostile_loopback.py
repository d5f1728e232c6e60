"""A hostile client over real loopback TCP (and TLS), speaking raw frames: what an
attacker who read PROTOCOL.md can do must end in a clean error, bounded memory and
no traceback in the realm's log (issue 14)."""

from __future__ import annotations

import socket
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer, task
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import serverFromString

from chatproto import tls
from chatproto.protocol import ClientFactory
from tests.conftest import fast_config, make_realm, raw_client, tcp_of, unsent, until

PW = "password-h"
#: What both kernel socket buffers of a stalled connection are pinned to (the kernel
#: doubles it): left to autotuning, loopback buffers grow to several MiB and a bound
#: would measure the machine's sysctls rather than the realm.
KERNEL_BUFFER = 64 * 1024


@pytest.fixture(params=["tcp", "tls"])
def listener(request: Any, tmp_path: Any) -> Any:
    """A realm with the default limits (but the send rate) on 127.0.0.1 port 0, over
    plain TCP or TLS: (realm, factory, address, ca)."""
    cfg = fast_config(tmp_path, send_burst=10**6, send_rate=10.0**6)
    realm = make_realm(cfg)
    pytest_twisted.blockon(realm.startService())
    factory = ClientFactory(realm)
    ca = None
    if request.param == "tcp":
        port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
        addr = f"tcp:127.0.0.1:{port.getHost().port}"
    else:
        certs = tls.write_dev_certs(str(tmp_path / "tls"), "localhost")
        desc = tls.server_description(certs["cert"], certs["key"], 0)
        port = pytest_twisted.blockon(serverFromString(_reactor, desc).listen(factory))
        addr = f"tls:127.0.0.1:{port.getHost().port}"
        ca = certs["ca"]
    yield realm, factory, addr, ca
    for proto in list(factory.connections):
        proto.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(realm.stopService())


def _server_side(factory: ClientFactory, device: str) -> Any:
    return next(
        p for p in factory.connections if p.session is not None and p.session.device == device
    )


@pytest_twisted.inlineCallbacks
def test_a_client_that_stops_reading_is_dropped_and_memory_stays_bounded(listener: Any) -> Any:
    """Issue 14, item 1, as found: one account, a session that never reads and one
    sending to itself.  The realm held everything for the reader (49 MiB, never
    dropped); now it holds at most max_output_buffer, then closes with slow_reader."""
    realm, factory, addr, ca = listener
    limit = realm.config.limits.max_output_buffer
    # What Twisted's TLS layer adds to a TCP transport's 64 KiB: it gathers small
    # writes up to 64 000 bytes before it encrypts them, and such a batch can cross
    # the TCP buffer's limit in one write.
    tls_slack = 2 * 64_000 if ca is not None else 0
    yield realm.create_user("alice", PW)
    reader = yield raw_client(addr, ("alice", PW), ca, device="reader")
    writer = yield raw_client(addr, ("alice", PW), ca, device="writer")
    server = _server_side(factory, "reader")
    kernel = 0
    for sock, opt in (
        (tcp_of(reader.transport).getHandle(), socket.SO_RCVBUF),
        (tcp_of(server.transport).getHandle(), socket.SO_SNDBUF),
    ):
        sock.setsockopt(socket.SOL_SOCKET, opt, KERNEL_BUFFER)
        kernel += sock.getsockopt(socket.SOL_SOCKET, opt)
    tcp_of(reader.transport).pauseProducing()  # the reader never reads again
    before = reader.received
    body = "x" * 16000
    frame_size = 16200  # a msg frame of that body, with its envelope
    sent = peak = 0
    cap = (limit + 8 * 2**20) // len(body)  # far past the limit: main never dropped it
    while server.state != "closed" and sent < cap:
        for _ in range(8):
            writer.send({"type": "send", "to": "alice", "body": body})
            sent += 1
        yield task.deferLater(_reactor, 0.005, lambda: None)
        peak = max(peak, server._out.held + unsent(server.transport))
    assert server.state == "closed", f"not dropped after {sent * len(body)} bytes"
    # Held: at most the limit, plus the transport's own buffer and a frame or two.
    assert peak <= limit + 64 * 1024 + tls_slack + 4 * frame_size
    assert sent * len(body) <= limit + kernel + 2 * 2**20
    # The reader reads again: what had reached its socket, whole frames, then the
    # error, then the close.  Not the megabytes that were held for it.
    tcp_of(reader.transport).resumeProducing()
    yield until(lambda: reader.lost.called)
    last = reader.frames[-1]
    assert last["type"] == "error" and last["code"] == "slow_reader"
    assert "id" not in last
    assert reader.received - before <= kernel + 64 * 1024 + tls_slack + 4 * frame_size
    positions = [f["pos"] for f in reader.frames if f.get("type") == "msg"]
    assert positions == sorted(set(positions))
    # Nothing lost: the device resumes after what it had read (here: since 0).
    again = yield raw_client(addr, ("alice", PW), ca, device="reader2", since=0)
    yield until(lambda: sum(f.get("type") == "msg" for f in again.frames) == sent, timeout=30)
    writer.transport.loseConnection()
    again.transport.loseConnection()
    yield defer.DeferredList([writer.lost, again.lost])


#: Frames Python's json reads but RFC 8259 does not allow (issue 14, item 3).
NON_STANDARD = {
    "nan": b'{"type":"send","id":1,"to":"bob","body":"nan","n":NaN}',
    "infinity": b'{"type":"send","id":1,"to":"bob","body":"inf","n":Infinity}',
    "-infinity": b'{"type":"send","id":1,"to":"bob","body":"-inf","n":[-Infinity]}',
    "nan-ack": b'{"type":"ack","pos":NaN}',
    "duplicate-name": b'{"type":"send","id":1,"to":"carol","to":"bob","body":"dup"}',
    "duplicate-nested": b'{"type":"send","id":1,"to":"bob","body":"dup2","x":{"a":1,"a":2}}',
    "huge-integer": b'{"type":"send","id":1,"to":"bob","body":"big","n":' + b"9" * 5000 + b"}",
}


@pytest.fixture
def server_tcp(tmp_path: Any) -> Any:
    cfg = fast_config(tmp_path, send_burst=10**6, send_rate=10.0**6)
    realm = make_realm(cfg)
    pytest_twisted.blockon(realm.startService())
    factory = ClientFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield realm, factory, f"tcp:127.0.0.1:{port.getHost().port}"
    for proto in list(factory.connections):
        proto.transport.abortConnection()
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(realm.stopService())


@pytest_twisted.inlineCallbacks
def test_non_standard_json_is_bad_frame_over_tcp(server_tcp: Any) -> Any:
    realm, _factory, addr = server_tcp
    yield realm.create_user("alice", PW)
    yield realm.create_user("bob", PW)
    for name, payload in NON_STANDARD.items():
        alice = yield raw_client(addr, ("alice", PW))
        alice.frames.clear()
        alice.send_raw(payload)
        yield until(lambda c=alice: c.lost.called)
        assert alice.frames and alice.frames[-1]["type"] == "error", (name, alice.frames)
        assert alice.frames[-1]["code"] == "bad_frame" and "id" not in alice.frames[-1], name
        assert [f["type"] for f in alice.frames] == ["error"], name  # nothing was sent
    assert (yield realm.store.max_pos()) == 0  # nothing stored
    # Valid JSON, however odd, is read: 1e400 in an unknown field is ignored, in a
    # field it is bad_request (the connection stays open).
    alice = yield raw_client(addr, ("alice", PW))
    alice.send_raw(b'{"type":"ping","id":"p","n":1e400,"m":[-1e400]}')
    assert (yield alice.reply("p")) == {"type": "result", "id": "p"}
    alice.send_raw(b'{"type":"history","id":"h","with":"bob","limit":1e400}')
    reply = yield alice.reply("h")
    assert reply["code"] == "bad_request"
    alice.send_raw(b'{"type":"ack","pos":-1e400}')
    alice.send_raw(b'{"type":"ping","id":"q"}')
    yield alice.reply("q")
    assert [f["code"] for f in alice.frames if f.get("type") == "error"] == [
        "bad_request",
        "bad_request",
    ]
    alice.transport.loseConnection()
    yield alice.lost


@pytest_twisted.inlineCallbacks
def test_names_shown_to_others_refuse_control_and_bidi_characters(server_tcp: Any) -> Any:
    """Issue 14, item 4, over TCP with raw frames: a file name with U+009B (the 8-bit
    CSI) was accepted; file names, topics, reasons, status texts and device names now
    refuse C0, DEL, C1, line separators and bidi overrides; bodies refuse ESC and C1."""
    realm, _factory, addr = server_tcp
    yield realm.create_user("alice", PW)
    yield realm.create_user("bob", PW)
    alice = yield raw_client(addr, ("alice", PW))
    sha = "0" * 64
    n = 0

    def ask(req: dict[str, Any]) -> Any:
        nonlocal n
        n += 1
        alice.send({**req, "id": n})
        return alice.reply(n)

    yield ask({"type": "create_group", "group": "#dev"})
    yield ask({"type": "invite", "group": "#dev", "user": "bob"})
    bad_labels = ["a\u009b[31mb.txt", "a\x1b[2Jb", "x\ny", "tab\there", "del\x7f", "nel\x85"]
    bad_labels += ["invoice_\u202efdp.exe", "iso\u2066late\u2069", "line\u2028sep"]
    for label in bad_labels:
        for req in (
            {"type": "file_offer", "to": "bob", "name": label, "size": 1, "sha256": sha},
            {"type": "set_topic", "group": "#dev", "topic": label},
            {"type": "ban", "group": "#dev", "user": "bob", "reason": label},
            {"type": "set_status", "status": "away", "text": label},
        ):
            reply = yield ask(req)
            assert reply["type"] == "error" and reply["code"] == "bad_request", (req, reply)
            assert "U+" in reply["message"], reply
        other = yield raw_client(addr)
        other.send({"type": "login", "id": "l", "user": "bob", "password": PW, "device": label})
        reply = yield other.reply("l")
        assert reply["code"] == "bad_request", (label, reply)
        other.transport.loseConnection()
    for body in ("esc \x1b[31mred", "csi \u009b31m", "nel\x85"):
        reply = yield ask({"type": "send", "to": "bob", "body": body})
        assert reply["code"] == "bad_request" and "U+" in reply["message"], (body, reply)
    # What stays allowed: names with marks and joiners, bodies with newlines, tabs,
    # IRC formatting and bidi controls (text in Arabic or Hebrew may need them).
    fine = "👩\u200d💻 \u200fשלום\u200e عربى 日本語.txt"  # noqa: RUF001
    for req in (
        {"type": "file_offer", "to": "bob", "name": fine, "size": 1, "sha256": sha},
        {"type": "set_topic", "group": "#dev", "topic": fine},
        {"type": "set_status", "status": "away", "text": fine},
        {"type": "send", "to": "bob", "body": "2\nlines\tand \x02bold\x02 \u2067עב\u2069"},
    ):
        reply = yield ask(req)
        assert reply["type"] == "result", (req, reply)
    assert not [f for f in alice.frames if f.get("type") == "error" and "id" not in f]
    alice.transport.loseConnection()
    yield alice.lost
