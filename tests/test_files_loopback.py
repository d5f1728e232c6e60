"""File transfer over real loopback TCP and TLS, driven by the client library.

Sizes: empty, small, exactly one chunk, several MiB.  Interrupted uploads and downloads
are resumed on a new connection; limits, checksums and permissions are refused with
their codes; a client that stops reading does not make the realm buffer the file.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor
from twisted.internet.endpoints import serverFromString

from chatproto import tls
from chatproto.client import RemoteError, TransferInterrupted, connect
from chatproto.protocol import ClientFactory
from tests.conftest import until

PASSWORD = "password-files"
MiB = 1024 * 1024
KERNEL_BUFFER = 512 * 1024


def _file(tmp: Path, name: str, size: int) -> Path:
    path = tmp / name
    path.write_bytes(os.urandom(size))
    return path


@defer.inlineCallbacks
def _users(addr: str, *names: str, register: bool = True, **kw: Any) -> Any:
    conns = []
    for name in names:
        inbox: list[dict[str, Any]] = []
        conn = yield connect(
            _reactor, addr, name, PASSWORD, register=register, on_message=inbox.append, **kw
        )
        conn.inbox = inbox  # type: ignore[attr-defined]
        yield conn.synced
        conns.append(conn)
    return conns


def _stop_reading_at_start(bob: Any) -> Any:
    """A ``progress`` callback for ``bob.download`` that makes bob stop reading his
    socket when the download is answered (its first call): bob reads nothing past the
    read that brought the answer (the realm sends the data frames from the next reactor
    turn), however fast the machine, and the realm fills the kernel's buffers and is
    paused.  With ``pause()``, not the transport's ``pauseProducing``: the client's
    own flow control (a download's bytes waiting for the disk: ``_reading_backlog``)
    resumes the socket it paused unless the client is paused."""
    stopped: list[bool] = []

    def progress(done: int, total: int) -> None:
        if not stopped:
            stopped.append(True)
            bob.protocol.pause()

    return progress


def _stalled(conn: Any, sink: Any) -> bool:
    """The realm has stopped sending ``sink``'s download to ``conn`` because its peer
    does not read: the transport paused it (output blocked), the socket takes no more
    (the kernel's buffers are full: nothing drains the transport until the peer
    reads), and the file's producer is paused with the next block read and kept."""
    producer = sink.producer
    _, writable, _ = select.select([], [conn.transport.getHandle()], [], 0)
    return bool(
        conn._out.blocked
        and not writable
        and producer is not None
        and producer._paused
        and producer._ready is not None
        and not producer._reading
    )


@pytest_twisted.inlineCallbacks
def test_files_of_every_size_reach_the_recipient(server: Any, tmp_path: Path) -> Any:
    realm, _, addr = server
    alice, bob = yield _users(addr, "alice", "bob")
    chunk = alice.limits["file_chunk"]
    assert alice.limits["max_file_size"] == realm.config.files.max_file_size
    sizes = {"empty": 0, "small": 100, "chunk": chunk, "big": 3 * MiB + 7}
    for label, size in sizes.items():
        src = _file(tmp_path, label, size)
        seen: list[tuple[int, int]] = []
        r = yield alice.send_file("bob", str(src), progress=lambda d, t: seen.append((d, t)))  # noqa: B023
        assert seen[-1] == (size, size)
        yield until(lambda: any(m.get("meta", {}).get("file_id") == r["file"] for m in bob.inbox))  # noqa: B023
        msg = next(m for m in bob.inbox if m.get("meta", {}).get("file_id") == r["file"])
        assert msg["kind"] == "file" and msg["pos"] == r["pos"] and msg["body"] == label
        assert msg["meta"]["size"] == size
        assert msg["meta"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        dst = tmp_path / f"{label}.down"
        got: list[int] = []
        info = yield bob.download(r["file"], str(dst), progress=lambda d, t: got.append(d))  # noqa: B023
        assert dst.read_bytes() == src.read_bytes(), label
        assert info["name"] == label and info["from"] == "alice@localhost"
        assert got[-1] == size and not os.path.exists(str(dst) + ".part")
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_limits_checksum_and_permissions(server: Any, tmp_path: Path) -> Any:
    realm, _factory, addr = server
    realm.config.files.max_file_size = 2 * MiB
    realm.config.files.quota_per_user = 3 * MiB
    alice, bob, carol = yield _users(addr, "alice", "bob", "carol")
    big = _file(tmp_path, "big", 2 * MiB + 1)
    with pytest.raises(RemoteError) as e:
        yield alice.send_file("bob", str(big))
    assert e.value.code == "too_large" and e.value.extra["limit"] == 2 * MiB
    two = _file(tmp_path, "two", 2 * MiB)
    yield alice.send_file("bob", str(two))
    with pytest.raises(RemoteError) as e:
        yield alice.send_file("bob", str(two))
    assert e.value.code == "quota_exceeded" and e.value.extra["used"] == 2 * MiB
    assert not os.listdir(realm.files.store.part_path("x")[: -len("x.part")])  # no partials

    # a sha256 that does not match the bytes: refused at the end, nothing stored
    src = _file(tmp_path, "small", 1000)
    proto = alice.protocol
    r = yield proto.request("file_offer", to="bob", name="liar", size=1000, sha256="ab" * 32)
    yield proto.upload(r["stream"], str(src), 0, 1000, r["chunk"])
    with pytest.raises(RemoteError) as e:
        yield proto.request("file_finish", upload=r["upload"])
    assert e.value.code == "checksum_mismatch"
    assert not any(m.get("body") == "liar" for m in bob.inbox)

    # a group file: members may download it, others may not
    yield alice.create_group("team")
    yield bob.join("team")
    r = yield alice.send_file("#team", str(src))
    yield bob.download(r["file"], str(tmp_path / "team.down"))
    assert (tmp_path / "team.down").read_bytes() == src.read_bytes()
    with pytest.raises(RemoteError) as e:
        yield carol.download(r["file"], str(tmp_path / "carol.down"))
    assert e.value.code == "no_such_file"
    with pytest.raises(RemoteError) as e:
        yield carol.send_file("#team", str(src))
    assert e.value.code == "not_member"
    private = yield alice.send_file("bob", str(src))
    with pytest.raises(RemoteError) as e:
        yield carol.download(private["file"], str(tmp_path / "carol.down"))
    assert e.value.code == "no_such_file"
    assert not os.path.exists(tmp_path / "carol.down")
    for c in (alice, bob, carol):
        yield c.close()


def _abort_after(conn: Any, limit: int, factory: ClientFactory | None = None) -> Any:
    """A progress callback that cuts the connection once ``limit`` bytes are done."""
    state = {"cut": False}

    def progress(done: int, total: int) -> None:
        if done >= limit and not state["cut"]:
            state["cut"] = True
            conn.protocol.transport.abortConnection()

    return progress


def _cut_reading_after(conn: Any, limit: int) -> None:
    """Cut ``conn``'s connection once it has read ``limit`` bytes from the network.

    For downloads: a progress callback counts bytes written to the ``.part`` file,
    which can lag behind what was read, so on a busy machine the whole file could be
    read (and the download finished) before it fired.  Counting what the protocol
    reads cuts the transfer mid-bytes whatever the machine's speed.
    """
    proto = conn.protocol
    received = proto.dataReceived
    state = {"read": 0}

    def counting(data: bytes) -> None:
        if state["read"] >= limit:
            return  # cut: nothing more is read
        state["read"] += len(data)
        received(data)
        if state["read"] >= limit:
            proto.transport.abortConnection()

    proto.dataReceived = counting


@pytest_twisted.inlineCallbacks
def test_interrupted_upload_and_download_resume(server: Any, tmp_path: Path) -> Any:
    realm, factory, addr = server
    alice, bob = yield _users(addr, "alice", "bob", device="d1")
    src = _file(tmp_path, "movie", 6 * MiB + 3)
    with pytest.raises(TransferInterrupted) as e:
        yield alice.send_file("bob", str(src), progress=_abort_after(alice, 2 * MiB))
    upload = e.value.upload
    assert upload is not None
    # the realm keeps what arrived; a new connection continues from there.  (Once the
    # realm has seen the connection go: until then it may still read bytes the kernel
    # had buffered, and the writer's queue may be empty between two reads.)
    yield until(
        lambda: (
            not any(
                p.session is not None and p.session.user_id == "alice@localhost"
                for p in factory.connections
            )
        )
    )
    yield until(lambda: not realm.files.uploads[upload].writer.pending)
    have = realm.files.uploads[upload].offset
    assert 0 < have < src.stat().st_size
    (alice,) = yield _users(addr, "alice", register=False, device="d2")
    starts: list[int] = []
    r = yield alice.send_file(
        "bob", str(src), resume=upload, progress=lambda d, t: starts.append(d)
    )
    assert starts[0] == have  # only the rest was sent
    assert r["upload"] == upload and upload not in realm.files.uploads

    dst = tmp_path / "movie.down"
    _cut_reading_after(bob, 2 * MiB)
    with pytest.raises(TransferInterrupted):
        yield bob.download(r["file"], str(dst))
    part = Path(str(dst) + ".part")
    partial = part.stat().st_size
    assert 0 < partial < src.stat().st_size and not dst.exists()
    (bob,) = yield _users(addr, "bob", register=False, device="d2")
    starts = []
    yield bob.download(r["file"], str(dst), progress=lambda d, t: starts.append(d))
    assert starts[0] == partial  # a ranged download of the rest
    assert dst.read_bytes() == src.read_bytes() and not part.exists()
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_cancel_over_the_wire(server: Any, tmp_path: Path) -> Any:
    realm, _, addr = server
    alice, _bob = yield _users(addr, "alice", "bob")
    src = _file(tmp_path, "f", 3 * MiB)
    with pytest.raises(TransferInterrupted) as e:
        yield alice.send_file("bob", str(src), progress=_abort_after(alice, MiB))
    (alice,) = yield _users(addr, "alice", register=False)
    yield alice.cancel_upload(e.value.upload)
    assert not realm.files.uploads
    with pytest.raises(RemoteError) as err:
        yield alice.send_file("bob", str(src), resume=e.value.upload)
    assert err.value.code == "no_such_upload"
    yield alice.close()
    yield _bob.close()


@defer.inlineCallbacks
def _stalled_download(factory: Any, addr: Any, tmp_path: Path, size: int) -> Any:
    """Alice sends bob a file of ``size`` bytes; bob downloads it and stops reading his
    socket when the download is answered, with both kernel buffers of his connection
    pinned (left to autotuning, loopback buffers grow to tcp_rmem/tcp_wmem's maximum,
    32 MiB + 4 MiB on some machines, and a bound would measure the machine's sysctls
    rather than the realm).  Fires, once the realm has stalled mid-file (the kernel's
    buffers full, the transport pausing the realm, the file's reading stopped), with
    ``(alice, bob, send result, bob's connection in the realm, its download sink, the
    download's Deferred, the kernel buffers' bytes, the file, the destination)``."""
    alice, bob = yield _users(addr, "alice", "bob")
    src = _file(tmp_path, "large", size)
    r = yield alice.send_file("bob", str(src))
    server_side = next(p for p in factory.connections if p.session.user_id == "bob@localhost")
    kernel = 0
    for sock, opt in (
        (bob.protocol.transport.getHandle(), socket.SO_RCVBUF),
        (server_side.transport.getHandle(), socket.SO_SNDBUF),
    ):
        sock.setsockopt(socket.SOL_SOCKET, opt, KERNEL_BUFFER)
        kernel += sock.getsockopt(socket.SOL_SOCKET, opt)  # the kernel doubles it
    dst = tmp_path / "large.down"
    d = bob.download(r["file"], str(dst), progress=_stop_reading_at_start(bob))
    yield until(lambda: bob.protocol.paused)  # bob stops reading, before the file's bytes
    (sink,) = server_side._download_sinks.values()
    # (a realm that kept sending to a reader that stopped never gets there)
    yield until(lambda: _stalled(server_side, sink), timeout=30)
    return alice, bob, r, server_side, sink, d, kernel, src, dst


@pytest_twisted.inlineCallbacks
def test_a_reader_that_stops_does_not_make_the_realm_buffer_the_file(
    server: Any, tmp_path: Path
) -> Any:
    _realm, factory, addr = server
    size = 48 * MiB
    alice, bob, _r, server_side, sink, d, kernel, src, dst = yield _stalled_download(
        factory, addr, tmp_path, size
    )
    # what left the realm and bob has not read is what the kernel buffers hold (and a
    # frame or two in flight), not the file
    (receiver,) = bob.protocol._receivers.values()
    in_flight = sink.offset - receiver.expected
    assert in_flight < kernel + MiB < size // 8
    buffered = len(server_side.transport.dataBuffer) + server_side.transport._tempDataLen
    assert buffered + server_side._out.held <= 512 * 1024  # about one block, held or not
    bob.protocol.resume()
    yield d
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    yield alice.close()
    yield bob.close()


@pytest.fixture
def certs(tmp_path: Path) -> dict[str, str]:
    return tls.write_dev_certs(str(tmp_path / "tls"), "localhost")


@pytest_twisted.inlineCallbacks
def test_files_over_tls(realm: Any, certs: dict[str, str], tmp_path: Path) -> Any:
    factory = ClientFactory(realm)
    desc = tls.server_description(certs["cert"], certs["key"], 0)
    port = yield serverFromString(_reactor, desc).listen(factory)
    addr = f"tls:127.0.0.1:{port.getHost().port}"
    try:
        alice, bob = yield _users(addr, "alice", "bob", realm="localhost", ca=certs["ca"])
        chunk = alice.limits["file_chunk"]
        for size in (0, 10, chunk, 2 * MiB + 1):
            src = _file(tmp_path, f"t{size}", size)
            r = yield alice.send_file("bob@localhost", str(src))
            dst = tmp_path / f"t{size}.down"
            yield bob.download(r["file"], str(dst))
            assert dst.read_bytes() == src.read_bytes()
        # an interrupted upload and an interrupted download, resumed
        src = _file(tmp_path, "resume", 4 * MiB)
        with pytest.raises(TransferInterrupted) as e:
            yield alice.send_file("bob", str(src), progress=_abort_after(alice, MiB))
        kw = {"register": False, "realm": "localhost", "ca": certs["ca"]}
        (alice,) = yield _users(addr, "alice", **kw)
        r = yield alice.send_file("bob", str(src), resume=e.value.upload)
        dst = tmp_path / "r.down"
        _cut_reading_after(bob, MiB)
        with pytest.raises(TransferInterrupted):
            yield bob.download(r["file"], str(dst))
        assert Path(str(dst) + ".part").stat().st_size > 0
        (bob,) = yield _users(addr, "bob", **kw)
        yield bob.download(r["file"], str(dst))
        assert dst.read_bytes() == src.read_bytes()
        yield alice.close()
        yield bob.close()
    finally:
        for proto in list(factory.connections):
            proto.transport.abortConnection()
        yield port.stopListening()


@pytest_twisted.inlineCallbacks
def test_an_unfinished_upload_survives_a_realm_restart(tmp_path: Path) -> Any:
    from twisted.internet.testing import StringTransport

    from tests.conftest import fast_config, make_realm

    cfg = fast_config(tmp_path)
    realm = make_realm(cfg)
    yield realm.startService()
    yield realm.create_user("alice", PASSWORD)
    yield realm.create_user("bob", PASSWORD)
    data = os.urandom(300_000)
    up = yield realm.files.offer(
        "alice@localhost", "bob", "x.bin", len(data), hashlib.sha256(data).hexdigest()
    )
    yield realm.files.write("alice@localhost", up.upload_id, 0, data[:200_000])
    yield realm.stopService()

    realm = make_realm(cfg)  # a new process, as far as the realm can tell
    yield realm.startService()
    try:
        again = yield realm.files.status("alice@localhost", up.upload_id)
        assert again.offset == 200_000 and again.size == len(data)
        yield realm.files.write("alice@localhost", up.upload_id, 200_000, data[200_000:])
        info, env = yield realm.files.finish("alice@localhost", up.upload_id)
        assert env.kind == "file" and info.size == len(data)
        dl = yield realm.files.open_download("bob@localhost", info.file_id)
        consumer = StringTransport()
        yield dl.start(consumer)
        assert consumer.value() == data
    finally:
        yield realm.stopService()


@pytest_twisted.inlineCallbacks
def test_client_service_resumes_transfers_across_reconnects(server: Any, tmp_path: Path) -> Any:
    from tests.conftest import drop_sessions, resuming_service

    realm, factory, addr = server
    yield realm.create_user("alice", PASSWORD)
    yield realm.create_user("bob", PASSWORD)
    alice = resuming_service(addr, "alice", PASSWORD)
    bob = resuming_service(addr, "bob", PASSWORD)
    alice.startService()
    bob.startService()
    try:
        src = _file(tmp_path, "f", 5 * MiB)
        cuts: list[int] = []

        def cut(user: str) -> Any:
            def progress(done: int, total: int) -> None:
                if done >= MiB * (len(cuts) + 1) and len(cuts) < 2:
                    cuts.append(done)
                    drop_sessions(factory, f"{user}@localhost")

            return progress

        r = yield alice.send_file("bob", str(src), progress=cut("alice"))
        assert len(cuts) == 2
        cuts.clear()
        dst = tmp_path / "f.down"
        yield bob.download(r["file"], str(dst), progress=cut("bob"))
        assert len(cuts) == 2 and dst.read_bytes() == src.read_bytes()
    finally:
        yield alice.stopService()
        yield bob.stopService()


@defer.inlineCallbacks
def _fails_when_read_again(bob: Any, sink: Any, d: Any, size: int) -> Any:
    """Bob's stalled download ``d`` (of ``size`` bytes, into ``sink``), whose file is
    gone meanwhile, fails with no_such_file once bob reads again, having received
    no more than the part of the file it had before."""
    sent = sink.offset
    bob.protocol.resume()
    with pytest.raises(RemoteError) as e:
        yield d
    assert e.value.code == "no_such_file"
    assert sent < size and sink.offset == sent


@pytest_twisted.inlineCallbacks
def test_a_download_of_a_file_deleted_meanwhile_ends_with_no_such_file(
    server: Any, tmp_path: Path
) -> Any:
    """Bob downloads a large file and reads slowly (stops reading); meanwhile alice
    deletes it.  The realm kept sending its bytes to the end; now it stops: the
    download fails with no_such_file (for its stream) once bob reads again, having
    received a part of the file only, and the connection stays open."""
    _realm, factory, addr = server
    size = 16 * MiB
    alice, bob, r, server_side, sink, d, _kernel, _src, _dst = yield _stalled_download(
        factory, addr, tmp_path, size
    )
    yield alice.delete(r["msg_id"])
    assert not server_side._download_sinks  # stopped at once
    yield _fails_when_read_again(bob, sink, d, size)
    pong = yield bob.protocol.request("ping")
    assert pong["type"] == "result"
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_a_download_of_a_file_that_expires_meanwhile_ends_with_no_such_file(
    server: Any, tmp_path: Path
) -> Any:
    """Bob downloads a large file and stops reading; meanwhile the retention clean-up
    forgets the file (it is older than ``retention_days``) and removes its bytes.  The
    realm kept sending them (from the open file) to the end; now the download fails
    with no_such_file once bob reads again, having received a part of the file only."""
    realm, factory, addr = server
    size = 16 * MiB
    alice, bob, _r, _conn, sink, d, _kernel, _src, _dst = yield _stalled_download(
        factory, addr, tmp_path, size
    )
    realm.files.config.retention_days = 0  # every file is expired now
    counts = yield realm.files.cleanup()
    assert counts["blobs"] == 1
    yield _fails_when_read_again(bob, sink, d, size)
    yield alice.close()
    yield bob.close()


@pytest_twisted.inlineCallbacks
def test_a_blob_removed_while_its_download_is_opened_answers_no_such_file(
    server: Any, tmp_path: Path
) -> Any:
    """The clean-up removed a file's bytes (orphaned: its record deleted by another
    worker of the realm) just after bob's download request found them on disk: the
    realm answered the request and the download then failed on the missing file
    (not the documented no_such_file).  Now the bytes are opened before the answer:
    bob gets no_such_file, and the connection goes on."""
    realm, _, addr = server
    alice, bob = yield _users(addr, "alice", "bob")
    r = yield alice.send_file("bob", str(_file(tmp_path, "a.bin", 1000)))
    store = realm.files.store
    has_blob = store.has_blob

    def racing(sha256: str) -> Any:
        def removed(there: bool) -> bool:
            os.unlink(store.blob_path(sha256))  # (what the clean-up did meanwhile)
            return there

        return has_blob(sha256).addCallback(removed)

    store.has_blob = racing
    with pytest.raises(RemoteError) as e:
        yield bob.download(r["file"], str(tmp_path / "a.down"))
    assert e.value.code == "no_such_file"
    assert not realm.files.downloads
    pong = yield bob.protocol.request("ping")
    assert pong["type"] == "result"
    yield alice.close()
    yield bob.close()
