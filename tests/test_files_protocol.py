"""File requests and binary data frames over StringTransport (no sockets, no threads).

A realm on a MemoryStore, time from a ``task.Clock``, disk work inline in a temporary
data directory.  Input is fed whole and one byte at a time.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock

from chatproto import wire
from chatproto.errors import ChatError
from chatproto.testing import connect_string_transport, frame, make_test_realm, parse_frames
from tests.conftest import fast_config


def data_frame(op: int, stream: int, offset: int, data: bytes) -> bytes:
    payload = wire.encode_data(op, stream, offset, data)
    return struct.pack("!I", len(payload)) + payload


def split_frames(raw: bytes) -> tuple[list[dict[str, Any]], list[tuple[int, int, int, bytes]]]:
    """Control frames and data frames in ``raw``, each in order."""
    control, data = [], []
    while raw:
        (n,) = struct.unpack("!I", raw[:4])
        payload, raw = raw[4 : 4 + n], raw[4 + n :]
        if payload[:1] == b"\x00":
            data.append(wire.decode_data(payload))
        else:
            control += parse_frames(struct.pack("!I", n) + payload)
    return control, data


class Conn:
    def __init__(self, realm: Any, clock: Clock, name: str, bytewise: bool = False) -> None:
        if name not in realm.store.users:
            realm.create_user(name, "password1")
        self.clock = clock
        self.bytewise = bytewise
        self.proto, self.t = connect_string_transport(realm)
        self.pending: list[tuple[int, int, int, bytes]] = []
        self.feed(frame({"type": "hello", "version": 1}))
        self.feed(frame({"type": "login", "user": name, "password": "password1"}))
        self.read()

    def feed(self, data: bytes) -> None:
        if self.bytewise:
            for i in range(len(data)):
                self.proto.dataReceived(data[i : i + 1])
        else:
            self.proto.dataReceived(data)
        self.clock.advance(0)

    def read(self) -> tuple[list[dict[str, Any]], list[tuple[int, int, int, bytes]]]:
        """Frames written since the last read (data frames a ``req`` saw included)."""
        raw = self.t.value()
        self.t.clear()
        control, data = split_frames(raw)
        data, self.pending = self.pending + data, []
        return control, data

    def req(self, type_: str, **fields: Any) -> dict[str, Any]:
        self.feed(frame({"type": type_, "id": "r", **fields}))
        control, self.pending = self.read()
        replies = [f for f in control if f.get("id") == "r"]
        assert len(replies) == 1, control
        return replies[0]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def realm(tmp_path: Any, clock: Clock) -> Any:
    return make_test_realm(clock, fast_config(tmp_path))


@pytest.mark.parametrize("bytewise", [False, True])
def test_upload_then_download(realm: Any, clock: Clock, bytewise: bool) -> None:
    alice = Conn(realm, clock, "alice", bytewise)
    bob = Conn(realm, clock, "bob")
    chunk = realm.config.files.chunk_size
    data = os.urandom(2 * chunk + 10)
    sha = hashlib.sha256(data).hexdigest()
    r = alice.req("file_offer", to="bob", name="x.bin", size=len(data), sha256=sha)
    assert r["type"] == "result" and r["offset"] == 0 and r["chunk"] == chunk
    stream = r["stream"]
    frames = b"".join(
        data_frame(wire.OP_UPLOAD, stream, i, data[i : i + chunk])
        for i in range(0, len(data), chunk)
    )
    alice.feed(frames)
    assert alice.read() == ([], [])  # data frames are not answered
    done = alice.req("file_finish", upload=r["upload"])
    assert done["type"] == "result" and done["pos"] > 0
    control, _ = bob.read()
    [msg] = [f for f in control if f["type"] == "msg"]
    assert msg["kind"] == "file" and msg["meta"]["file_id"] == done["file"]

    d = bob.req("download", file=done["file"], offset=5)
    assert d["type"] == "result" and d["length"] == len(data) - 5 and d["sha256"] == sha
    clock.advance(0)  # the data frames follow the result
    _, got = bob.read()
    assert all(op == wire.OP_DOWNLOAD and s == d["stream"] for op, s, _, _ in got)
    assert [off for _, _, off, _ in got] == list(range(5, len(data), chunk))
    assert all(len(b) <= chunk for *_, b in got)
    assert b"".join(b for *_, b in got) == data[5:]
    assert not bob.proto._download_sinks  # finished and forgotten


def test_resume_of_a_finished_upload_gives_the_post(realm: Any, clock: Clock) -> None:
    """file_resume and file_finish of an upload already posted (the client lost the
    answer) give the post again: nothing is sent or posted twice."""
    alice = Conn(realm, clock, "alice")
    data = b"meow"
    sha = hashlib.sha256(data).hexdigest()
    Conn(realm, clock, "bob")
    r = alice.req("file_offer", to="bob", name="x.txt", size=4, sha256=sha)
    alice.feed(data_frame(wire.OP_UPLOAD, r["stream"], 0, data))
    done = alice.req("file_finish", upload=r["upload"])
    again = Conn(realm, clock, "alice")  # another connection, as after a lost one
    resumed = again.req("file_resume", upload=r["upload"])
    post = {k: done[k] for k in ("file", "pos", "msg_id", "ts")}
    assert resumed == {"type": "result", "id": "r", "upload": r["upload"], "finished": True, **post}
    assert again.req("file_finish", upload=r["upload"]) == done
    assert Conn(realm, clock, "bob").req("file_resume", upload=r["upload"])["code"] == (
        "no_such_upload"
    )
    assert [i.kind for i in realm.store.items].count("file") == 1


def test_data_frame_errors(realm: Any, clock: Clock) -> None:
    alice = Conn(realm, clock, "alice")
    Conn(realm, clock, "bob")
    r = alice.req("file_offer", to="bob", name="x", size=10, sha256="0" * 64)
    s = r["stream"]
    alice.feed(data_frame(wire.OP_UPLOAD, s + 7, 0, b"ab"))  # unknown stream
    [err], _ = alice.read()
    assert err["code"] == "no_such_upload" and err["stream"] == s + 7 and "id" not in err
    alice.feed(data_frame(wire.OP_UPLOAD, s, 3, b"ab"))  # not where the upload ends
    [err], _ = alice.read()
    assert (err["code"], err["offset"], err["stream"]) == ("bad_offset", 0, s)
    assert err["upload"] == r["upload"]
    alice.feed(data_frame(wire.OP_UPLOAD, s, 0, b"ab"))  # dropped: the stream failed
    assert alice.read() == ([], [])
    assert realm.files.uploads[r["upload"]].offset == 0
    again = alice.req("file_resume", upload=r["upload"])
    assert again["stream"] != s and again["offset"] == 0
    alice.feed(data_frame(wire.OP_UPLOAD, again["stream"], 0, b"0123456789"))
    assert alice.req("file_finish", upload=r["upload"])["code"] == "checksum_mismatch"
    assert not alice.t.disconnecting


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00\x01\x00",  # short header
        wire.DATA_HEADER.pack(0, 9, 1, 0) + b"x",  # unknown op
        wire.DATA_HEADER.pack(0, wire.OP_DOWNLOAD, 1, 0) + b"x",  # a client never sends it
        wire.DATA_HEADER.pack(0, wire.OP_UPLOAD, 1, 2**60) + b"x",  # offset out of range
    ],
)
def test_malformed_data_frames_close_the_connection(
    realm: Any, clock: Clock, payload: bytes
) -> None:
    alice = Conn(realm, clock, "alice")
    alice.feed(struct.pack("!I", len(payload)) + payload)
    [err], _ = alice.read()
    assert err["code"] == "bad_frame" and alice.t.disconnecting


def test_data_frames_need_a_session(realm: Any) -> None:
    proto, t = connect_string_transport(realm)
    proto.dataReceived(data_frame(wire.OP_UPLOAD, 1, 0, b"x"))
    [err] = parse_frames(t.value())
    assert err["code"] == "bad_frame" and t.disconnecting


def test_download_pauses_with_the_transport(realm: Any, clock: Clock) -> None:
    """A paused transport (a reader that stopped) stops the download: the realm
    writes at most one more block, whatever the file's size."""
    data = os.urandom(4 * 1024 * 1024)
    files = realm.files
    realm.create_user("alice", "password1")
    realm.create_user("bob", "password1")
    up = files.offer("alice@localhost", "bob", "big", len(data), hashlib.sha256(data).hexdigest())
    upload = up.result
    files.write("alice@localhost", upload.upload_id, 0, data)
    info, _ = files.finish("alice@localhost", upload.upload_id).result
    bob = Conn(realm, clock, "bob")
    bob.read()
    bob.proto.pauseProducing()  # as the transport does when its buffer is full
    bob.feed(frame({"type": "download", "id": "r", "file": info.file_id}))
    clock.advance(1)
    assert bob.read() == ([], [])  # nothing written while paused
    held = bob.proto._out.held
    assert held <= 256 * 1024 + 2048  # the result and one block at most, not the file
    clock.advance(10)
    assert bob.proto._out.held == held  # nothing more while paused
    bob.proto.resumeProducing()  # (a StringTransport never pauses again: all comes)
    control, got = bob.read()
    assert [f["id"] for f in control] == ["r"] and control[0]["length"] == len(data)
    assert b"".join(b for *_, b in got) == data


def test_cancel_download(realm: Any, clock: Clock) -> None:
    realm.create_user("alice", "password1")
    up = realm.files.offer("alice@localhost", "alice", "f", 3, hashlib.sha256(b"abc").hexdigest())
    realm.files.write("alice@localhost", up.result.upload_id, 0, b"abc")
    info, _ = realm.files.finish("alice@localhost", up.result.upload_id).result
    alice = Conn(realm, clock, "alice")
    alice.read()
    alice.proto.pauseProducing()
    alice.feed(frame({"type": "download", "id": "d", "file": info.file_id}))
    alice.feed(frame({"type": "download_cancel", "id": "c", "stream": 1}))
    alice.proto.resumeProducing()
    clock.advance(0)
    control, data = alice.read()
    assert [(f["type"], f["id"]) for f in control] == [("result", "d"), ("result", "c")]
    assert control[0]["stream"] == 1 and data == []


@given(st.binary(max_size=40))
def test_decode_data_never_crashes(payload: bytes) -> None:
    try:
        op, stream, offset, data = wire.decode_data(payload)
    except ChatError as e:
        assert e.code == "bad_frame"
    else:
        assert wire.encode_data(op, stream, offset, data) == payload


def test_a_download_streaming_when_its_file_is_deleted_stops_with_no_such_file(
    realm: Any, clock: Clock
) -> None:
    """A file deleted (``delete`` of its message by its sender) while a download of
    it streams: the download kept sending the deleted file's bytes to the end.  Now no
    more of them go out; the download ends with an error frame ``no_such_file``
    naming its stream, and the connection stays open."""
    from twisted.internet.defer import Deferred

    from chatproto.transfer import BLOCK

    alice = Conn(realm, clock, "alice")
    bob = Conn(realm, clock, "bob")
    chunk = realm.config.files.chunk_size
    data = os.urandom(4 * BLOCK)
    sha = hashlib.sha256(data).hexdigest()
    r = alice.req("file_offer", to="bob", name="x.bin", size=len(data), sha256=sha)
    alice.feed(
        b"".join(
            data_frame(wire.OP_UPLOAD, r["stream"], i, data[i : i + chunk])
            for i in range(0, len(data), chunk)
        )
    )
    done = alice.req("file_finish", upload=r["upload"])
    bob.read()
    # disk reads of downloads now wait to be run here: one block at a time
    reads: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def run(fn: Any, *args: Any) -> Deferred[Any]:
        reads.append((Deferred(), fn, args))
        return reads[-1][0]

    def step() -> None:
        d, fn, args = reads.pop(0)
        d.callback(fn(*args))

    realm.files.store.run = run
    bob.proto.dataReceived(frame({"type": "download", "id": "dl", "file": done["file"]}))
    step()  # (is the blob there)
    step()  # (the blob opened for the download)
    clock.advance(0)  # the result went out: the data frames follow
    step()  # the first block
    control, got = bob.read()
    [d] = [f for f in control if f.get("id") == "dl"]
    assert 0 < len(got) * chunk < len(data)  # streaming, not finished
    alice.proto.dataReceived(frame({"type": "delete", "id": "del", "msg_id": done["msg_id"]}))
    clock.advance(0)
    [deleted] = [f for f in alice.read()[0] if f.get("id") == "del"]
    assert deleted["type"] == "result"
    for _ in range(10):
        if reads:
            step()
    assert not reads
    control, more = bob.read()
    errors = [f for f in control if f["type"] == "error"]
    assert errors == [
        {
            "type": "error",
            "code": "no_such_file",
            "message": f"file {done['file']} was deleted",
            "stream": d["stream"],
        }
    ]
    assert not more  # not one byte more
    assert len(got + more) * chunk < len(data)
    assert not bob.proto._download_sinks and not realm.files.downloads
    assert bob.req("ping")["type"] == "result"  # the connection stays open
    assert bob.req("download", file=done["file"])["code"] == "no_such_file"


def test_a_download_whose_file_is_deleted_while_it_opens_is_no_such_file(
    realm: Any, clock: Clock
) -> None:
    """A delete committed while a download is being opened (the file's record read,
    its bytes being looked for on disk): the download was answered and streamed the
    deleted file's bytes.  Now it is answered no_such_file and sends none."""
    from twisted.internet.defer import Deferred

    from chatproto.transfer import inline

    alice = Conn(realm, clock, "alice")
    bob = Conn(realm, clock, "bob")
    data = os.urandom(1000)
    sha = hashlib.sha256(data).hexdigest()
    r = alice.req("file_offer", to="bob", name="x.bin", size=len(data), sha256=sha)
    alice.feed(data_frame(wire.OP_UPLOAD, r["stream"], 0, data))
    done = alice.req("file_finish", upload=r["upload"])
    bob.read()
    held: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def run(fn: Any, *args: Any) -> Deferred[Any]:
        held.append((Deferred(), fn, args))
        return held[-1][0]

    realm.files.store.run = run
    bob.proto.dataReceived(frame({"type": "download", "id": "dl", "file": done["file"]}))
    assert len(held) == 1  # is the blob there: asked, not answered yet
    realm.files.store.run = inline
    alice.proto.dataReceived(frame({"type": "delete", "id": "del", "msg_id": done["msg_id"]}))
    clock.advance(0)
    [deleted] = [f for f in alice.read()[0] if f.get("id") == "del"]
    assert deleted["type"] == "result"
    d, fn, _ = held.pop()
    assert fn is os.path.exists
    d.callback(True)  # the blob was there when asked (before the delete removed it)
    clock.advance(0)
    control, got = bob.read()
    [answer] = [f for f in control if f.get("id") == "dl"]
    assert (answer["type"], answer["code"]) == ("error", "no_such_file")
    assert not got and not bob.proto._download_sinks and not realm.files.downloads
