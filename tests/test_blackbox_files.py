"""Black-box tests of PROTOCOL.md's file requests and binary data frames (sections
"File requests", "Files", "Binary data frames"), over loopback TCP with raw frames:
a hostile client that lies about sizes and hashes, sends frames out of order or for
transfers that are not its own, and asks for files it may not see."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import pytest_twisted

from tests.blackbox import call, code, data_frame, errors, login, msgs, serve, wait_for
from tests.conftest import fast_config, raw_client, until

CHUNK = 1024
MAX_FILE = 4096
QUOTA = 10000
UPLOADS = 5


@pytest.fixture
def files_server(tmp_path: Any) -> Any:
    cfg = fast_config(tmp_path, send_burst=10_000, send_rate=10_000.0)
    cfg.files.chunk_size = CHUNK
    cfg.files.max_file_size = MAX_FILE
    cfg.files.quota_per_user = QUOTA
    cfg.files.max_uploads_per_user = UPLOADS
    yield from serve(cfg, ("alice", "bob", "carol"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def offer(recipient: str, data: bytes, **over: Any) -> dict[str, Any]:
    base = {
        "type": "file_offer",
        "to": recipient,
        "name": "f.bin",
        "size": len(data),
        "sha256": sha(data),
    }
    return {**base, **over}


GOOD = b"x" * 10

#: file_offer fields and the code PROTOCOL.md gives them ("Errors, all before any
#: byte is sent").
OFFERS = [
    ("size at max_file_size", {"size": MAX_FILE}, None),
    ("size one past max_file_size", {"size": MAX_FILE + 1}, "too_large"),
    ("size 2^53-1", {"size": 2**53 - 1}, "too_large"),
    ("size 2^53", {"size": 2**53}, "bad_request"),
    ("size -1", {"size": -1}, "bad_request"),
    ("size 1.5", {"size": 1.5}, "bad_request"),
    ("size true", {"size": True}, "bad_request"),
    ("name 255", {"name": "n" * 255}, None),
    ("name 256", {"name": "n" * 256}, "bad_request"),
    ("name empty", {"name": ""}, "bad_request"),
    ("name slash", {"name": "a/b"}, "bad_request"),
    ("name backslash", {"name": "a\\b"}, "bad_request"),
    ("name control", {"name": "a\x07b"}, "bad_request"),
    ("name bidi", {"name": "a\u202eb"}, "bad_request"),
    ("sha256 63", {"sha256": "a" * 63}, "bad_request"),
    ("sha256 65", {"sha256": "a" * 65}, "bad_request"),
    ("sha256 not hex", {"sha256": "g" * 64}, "bad_request"),
    ("media_type no slash", {"media_type": "text"}, "bad_request"),
    ("media_type ok", {"media_type": "text/plain"}, None),
    ("to nobody", {"to": "nobody"}, "no_such_user"),
    ("to no group", {"to": "#nogroup"}, "no_such_group"),
    ("to remote", {"to": "bob@example.org"}, "remote_realm"),
    ("to bad address", {"to": "-bob"}, "bad_address"),
]


@pytest_twisted.inlineCallbacks
def test_file_offer_fields(files_server: Any) -> Any:
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    wrong = []
    for label, over, want in OFFERS:
        r = yield call(alice, offer("bob", GOOD, **over))
        if code(r) != want:
            wrong.append((label, r))
        if want is None:
            yield call(alice, {"type": "file_cancel", "upload": r["upload"]})
        if want == "too_large" and r.get("limit") != MAX_FILE:
            wrong.append((label, "limit", r))
    assert not wrong


@pytest_twisted.inlineCallbacks
def test_offer_result_and_a_whole_upload(files_server: Any) -> Any:
    """The result has the fields listed, the item reaches both parties with `body` =
    name and `meta` file_id/sha256/size/name/media_type, and the download returns it."""
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    bob = yield login(addr, "bob")
    data = bytes(range(256)) * 5  # 1280 bytes: two chunks
    r = yield call(alice, offer("Bob", data))
    assert r["type"] == "result"
    assert r["offset"] == 0 and r["chunk"] == CHUNK and r["to"] == "bob@localhost"
    assert r["media_type"] == "application/octet-stream"
    assert (r["name"], r["size"], r["sha256"]) == ("f.bin", len(data), sha(data))
    alice.send_raw(data_frame(r["stream"], 0, data[:CHUNK]))
    alice.send_raw(data_frame(r["stream"], CHUNK, data[CHUNK:]))
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    assert fin["type"] == "result", fin
    assert set(fin) >= {"file", "pos", "msg_id", "ts"}
    for c in (alice, bob):
        m = yield wait_for(c, lambda f: f.get("type") == "msg" and f.get("kind") == "file")
        assert m["body"] == "f.bin" and m["pos"] == fin["pos"]
        assert m["meta"] == {
            "file_id": fin["file"],
            "sha256": sha(data),
            "size": len(data),
            "name": "f.bin",
            "media_type": "application/octet-stream",
        }
    # Finish again: the same result, not a second post.
    again = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    assert {k: again.get(k) for k in ("file", "pos", "msg_id", "ts")} == {
        k: fin[k] for k in ("file", "pos", "msg_id", "ts")
    }
    res = yield call(alice, {"type": "file_resume", "upload": r["upload"]})
    assert res["finished"] is True and res["pos"] == fin["pos"] and res["file"] == fin["file"]
    assert len([m for m in msgs(bob) if m["kind"] == "file"]) == 1
    # Download: ranges at and past the edges.
    d = yield call(bob, {"type": "download", "file": fin["file"], "offset": 1000})
    assert d["type"] == "result" and d["offset"] == 1000 and d["length"] == len(data) - 1000
    assert (d["from"], d["to"], d["pos"]) == ("alice@localhost", "bob@localhost", fin["pos"])
    edge = yield call(bob, {"type": "download", "file": fin["file"], "offset": len(data)})
    assert edge["type"] == "result" and edge["length"] == 0
    past = yield call(bob, {"type": "download", "file": fin["file"], "offset": len(data) + 1})
    assert code(past) == "bad_request"
    long = yield call(
        bob, {"type": "download", "file": fin["file"], "offset": 10, "length": len(data) - 9}
    )
    assert code(long) == "bad_request"
    exact = yield call(
        bob, {"type": "download", "file": fin["file"], "offset": 10, "length": len(data) - 10}
    )
    assert exact["type"] == "result" and exact["length"] == len(data) - 10
    # Carol, not a party: no_such_file, as for an unknown file.
    carol = yield login(addr, "carol")
    for fid in (fin["file"], "nosuchfile"):
        nope = yield call(carol, {"type": "download", "file": fid})
        assert code(nope) == "no_such_file", nope


@pytest_twisted.inlineCallbacks
def test_lying_uploads(files_server: Any) -> Any:
    """Bytes that do not match the offer: fewer (incomplete, with offset), other
    (checksum_mismatch: discarded, so no_such_upload after)."""
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    r = yield call(alice, offer("bob", GOOD))
    alice.send_raw(data_frame(r["stream"], 0, GOOD[:4]))
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    assert code(fin) == "incomplete" and fin["offset"] == 4
    assert set(fin) == {"type", "code", "message", "id", "offset", "upload"}  # all of them
    assert fin["upload"] == r["upload"]
    alice.send_raw(data_frame(r["stream"], 4, b"y" * 6))
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    assert code(fin) == "checksum_mismatch", fin
    for req in ("file_resume", "file_finish", "file_cancel"):
        gone = yield call(alice, {"type": req, "upload": r["upload"]})
        assert code(gone) == "no_such_upload", (req, gone)


@pytest_twisted.inlineCallbacks
def test_data_frames_past_the_offered_size_or_chunk(files_server: Any) -> Any:
    """More bytes than `size`, or more than `file_chunk` in one frame: refused, and
    the upload never posts a file of another size."""
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    r = yield call(alice, offer("bob", GOOD))
    alice.send_raw(data_frame(r["stream"], 0, GOOD[:4]))
    alice.send_raw(data_frame(r["stream"], 4, GOOD[4:] + b"extra"))
    e = yield wait_for(alice, lambda f: f.get("code") == "too_large")
    assert "id" not in e and e["stream"] == r["stream"] and e["upload"] == r["upload"]
    assert e["limit"] == len(GOOD)
    alice.send_raw(data_frame(r["stream"], 4, GOOD[4:]))  # dropped: the stream stopped
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    assert code(fin) == "incomplete" and fin["offset"] == 4, fin
    res = yield call(alice, {"type": "file_resume", "upload": r["upload"]})
    assert res["offset"] == 4
    alice.send_raw(data_frame(res["stream"], 4, GOOD[4:]))
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    assert fin["type"] == "result" and not alice.lost.called, fin
    alice2 = yield login(addr, "alice")
    big = b"z" * (CHUNK + 1)
    r2 = yield call(alice2, offer("bob", big))
    alice2.send_raw(data_frame(r2["stream"], 0, big[:CHUNK]))  # exactly file_chunk: fine
    alice2.send_raw(data_frame(r2["stream"], CHUNK, big[CHUNK:] * (CHUNK + 1)))
    yield until(lambda: alice2.lost.called)
    assert errors(alice2)[-1]["code"] == "bad_frame", errors(alice2)


@pytest_twisted.inlineCallbacks
def test_data_frames_at_the_wrong_offset_and_stream(files_server: Any) -> Any:
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    data = b"abcdefghij"
    r = yield call(alice, offer("bob", data))
    s = r["stream"]
    alice.send_raw(data_frame(s, 0, data[:3]))
    alice.send_raw(data_frame(s, 5, data[5:]))  # a gap
    e = yield wait_for(alice, lambda f: f.get("code") == "bad_offset")
    assert "id" not in e and e["stream"] == s and e["upload"] == r["upload"] and e["offset"] == 3
    alice.send_raw(data_frame(s, 3, data[3:]))  # dropped: the stream is stopped
    res = yield call(alice, {"type": "file_resume", "upload": r["upload"]})
    assert res["offset"] == 3 and res["stream"] != s, res
    # The old stream is no longer open: no_such_upload with `stream`.
    alice.send_raw(data_frame(s, 3, data[3:]))
    e2 = yield wait_for(alice, lambda f: f.get("code") == "no_such_upload")
    assert e2["stream"] == s and "id" not in e2
    alice.send_raw(data_frame(res["stream"], 3, data[3:]))
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    assert fin["type"] == "result", fin
    # Bob cannot write to, resume, finish or cancel alice's upload.
    r3 = yield call(alice, offer("bob", data))
    bob = yield login(addr, "bob")
    for req in ("file_resume", "file_finish", "file_cancel"):
        nope = yield call(bob, {"type": req, "upload": r3["upload"]})
        assert code(nope) == "no_such_upload", (req, nope)
    bob.send_raw(data_frame(r3["stream"], 0, data))
    e3 = yield wait_for(bob, lambda f: f.get("code") == "no_such_upload" and "id" not in f)
    assert e3["stream"] == r3["stream"]


BAD_FRAMES = {
    "short header": b"\x00\x01\x00\x00\x00\x01\x00\x00",
    "unknown op": data_frame(1, 0, b"x", op=3),
    "download op": data_frame(1, 0, b"x", op=2),
    "offset 2^53": data_frame(1, 2**53, b"x"),
}


@pytest.mark.parametrize("label", sorted(BAD_FRAMES))
@pytest_twisted.inlineCallbacks
def test_malformed_data_frames_are_bad_frame(files_server: Any, label: str) -> Any:
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    yield call(alice, offer("bob", GOOD))
    alice.send_raw(BAD_FRAMES[label])
    yield until(lambda: alice.lost.called)
    assert errors(alice)[-1]["code"] == "bad_frame"


@pytest_twisted.inlineCallbacks
def test_data_frame_before_login_is_bad_frame(files_server: Any) -> Any:
    _realm, addr = files_server
    anon = yield raw_client(addr)
    anon.send_raw(data_frame(1, 0, b"x"))
    yield until(lambda: anon.lost.called)
    assert errors(anon)[-1]["code"] == "bad_frame"


@pytest_twisted.inlineCallbacks
def test_limits_of_uploads_and_quota(files_server: Any) -> Any:
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    ups = []
    for _ in range(UPLOADS):
        r = yield call(alice, offer("bob", b"q" * 100))
        assert r["type"] == "result", r
        ups.append(r)
    over = yield call(alice, offer("bob", b"q" * 100))
    assert code(over) == "limit_reached", over
    for r in ups:
        yield call(alice, {"type": "file_cancel", "upload": r["upload"]})
    # quota: 10000; three uploads of 4000 -> the third is past it.
    a = yield call(alice, offer("bob", b"a" * 4000))
    b = yield call(alice, offer("bob", b"b" * 4000))
    c = yield call(alice, offer("bob", b"c" * 2000))
    assert a["type"] == b["type"] == c["type"] == "result"
    d = yield call(alice, offer("bob", b"d" * 1))
    assert code(d) == "quota_exceeded" and d["quota"] == QUOTA and d["used"] == 10000, d
    done = yield call(alice, {"type": "file_cancel", "upload": c["upload"]})
    assert done["type"] == "result" and set(done) <= {"type", "id"}, done
    exact = yield call(alice, offer("bob", b"e" * 2000))
    assert exact["type"] == "result", exact


@pytest_twisted.inlineCallbacks
def test_group_files_and_who_may_download(files_server: Any) -> Any:
    """Under the history rule "joined" a member who joined after the file may not
    download it; a former member neither; an outsider gets not_member on offer."""
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    bob = yield login(addr, "bob")
    carol = yield login(addr, "carol")
    g = yield call(alice, {"type": "create_group", "group": "#g"})
    assert g["type"] == "result"
    nope = yield call(bob, offer("#g", GOOD))
    assert code(nope) == "not_member"
    r = yield call(alice, offer("#g", GOOD))
    alice.send_raw(data_frame(r["stream"], 0, GOOD))
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    assert fin["type"] == "result"
    yield call(bob, {"type": "join", "group": "#g"})
    late = yield call(bob, {"type": "download", "file": fin["file"]})
    assert code(late) == "no_such_file", late
    outsider = yield call(carol, {"type": "download", "file": fin["file"]})
    assert code(outsider) == "no_such_file", outsider
    r2 = yield call(alice, offer("#g", b"second"))
    alice.send_raw(data_frame(r2["stream"], 0, b"second"))
    fin2 = yield call(alice, {"type": "file_finish", "upload": r2["upload"]})
    ok = yield call(bob, {"type": "download", "file": fin2["file"]})
    assert ok["type"] == "result", ok
    yield call(bob, {"type": "leave", "group": "#g"})
    gone = yield call(bob, {"type": "download", "file": fin2["file"]})
    assert code(gone) == "no_such_file", gone


@pytest_twisted.inlineCallbacks
def test_download_cancel_stream_bounds(files_server: Any) -> Any:
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    for stream, want in ((0, "bad_request"), (2**32, "bad_request"), (1, None), (2**32 - 1, None)):
        r = yield call(alice, {"type": "download_cancel", "stream": stream})
        assert code(r) == want, (stream, r)


@pytest_twisted.inlineCallbacks
def test_empty_file_and_zero_length_download(files_server: Any) -> Any:
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    r = yield call(alice, offer("bob", b""))
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    assert fin["type"] == "result", fin
    d = yield call(alice, {"type": "download", "file": fin["file"]})
    assert d["length"] == 0 and d["size"] == 0
    ping = yield call(alice, {"type": "ping"})
    assert ping["type"] == "result"
    assert not [f for f in alice.frames if isinstance(f, bytes)]


@pytest_twisted.inlineCallbacks
def test_deleted_files_and_shared_content(files_server: Any) -> Any:
    """A deleted file cannot be downloaded and no longer counts against the quota;
    another file with the same bytes stays; a group under the history rule "all"
    lets a later member download what came before."""
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    bob = yield login(addr, "bob")
    carol = yield login(addr, "carol")
    data = b"s" * 4000

    def upload(client: Any, to: str, payload: bytes) -> Any:
        @pytest_twisted.inlineCallbacks
        def go() -> Any:
            r = yield call(client, offer(to, payload))
            assert r["type"] == "result", r
            for i in range(0, len(payload), CHUNK):
                client.send_raw(data_frame(r["stream"], i, payload[i : i + CHUNK]))
            fin = yield call(client, {"type": "file_finish", "upload": r["upload"]})
            assert fin["type"] == "result", fin
            return fin

        return go()

    mine = yield upload(alice, "bob", data)
    theirs = yield upload(bob, "alice", data)
    yield upload(alice, "bob", b"t" * 4000)
    full = yield call(alice, offer("bob", b"u" * 4000))
    assert code(full) == "quota_exceeded", full
    d = yield call(alice, {"type": "delete", "msg_id": mine["msg_id"]})
    assert d["type"] == "result", d
    for c in (alice, bob):
        gone = yield call(c, {"type": "download", "file": mine["file"]})
        assert code(gone) == "no_such_file", gone
    ok = yield call(alice, {"type": "download", "file": theirs["file"]})
    assert ok["type"] == "result" and ok["sha256"] == sha(data), ok
    yield wait_for(alice, lambda f: f.get("type") == "msg" and f.get("pos") == ok["pos"])
    room = yield call(alice, offer("bob", b"u" * 4000))
    assert room["type"] == "result", room
    yield call(alice, {"type": "file_cancel", "upload": room["upload"]})
    # History rule "all": carol, who joins later, downloads the earlier file.
    g = yield call(bob, {"type": "create_group", "group": "#all", "history": "all"})
    assert g["type"] == "result"
    early = yield upload(bob, "#all", b"early")
    yield call(carol, {"type": "join", "group": "#all"})
    got = yield call(carol, {"type": "download", "file": early["file"]})
    assert got["type"] == "result", got


@pytest_twisted.inlineCallbacks
def test_download_frames_and_concurrent_finishes(files_server: Any) -> Any:
    """Download data frames: op 0x02, the result's stream, contiguous offsets from
    `offset`, at most `file_chunk` bytes each, `length` bytes in all.  Two
    connections finishing one upload at once get one post."""
    import struct

    _realm, addr = files_server
    one = yield login(addr, "alice", device="one")
    two = yield login(addr, "alice", device="two")
    data = bytes(range(256)) * 14  # 3584 bytes
    r = yield call(one, offer("bob", data))
    for i in range(0, len(data), CHUNK):
        one.send_raw(data_frame(r["stream"], i, data[i : i + CHUNK]))
    one.send({"type": "file_finish", "upload": r["upload"], "id": "f1"})
    two.send({"type": "file_finish", "upload": r["upload"], "id": "f2"})
    f1 = yield one.reply("f1")
    f2 = yield two.reply("f2")
    assert f1["type"] == f2["type"] == "result", (f1, f2)
    assert (f1["pos"], f1["file"]) == (f2["pos"], f2["file"])
    yield call(one, {"type": "ping"})
    assert len([m for m in msgs(one) if m["kind"] == "file"]) == 1
    bob = yield login(addr, "bob")
    d = yield call(bob, {"type": "download", "file": f1["file"], "offset": 100, "length": 3000})
    assert d["type"] == "result" and (d["offset"], d["length"]) == (100, 3000), d
    yield until(lambda: sum(len(f) - 14 for f in bob.frames if isinstance(f, bytes)) >= 3000)
    got = b""
    expect = 100
    for f in bob.frames:
        if not isinstance(f, bytes):
            continue
        kind, op, stream, offset = f[0], f[1], *struct.unpack("!IQ", f[2:14])
        assert (kind, op, stream, offset) == (0, 2, d["stream"], expect)
        assert 0 < len(f) - 14 <= CHUNK
        got += f[14:]
        expect += len(f) - 14
    assert got == data[100:3100]


@pytest_twisted.inlineCallbacks
def test_finish_after_the_recipient_went_away(files_server: Any) -> Any:
    """The recipient deleted, or the sender no longer in the group, between offer and
    finish: no_such_user / not_member, nothing posted, the upload kept."""
    realm, addr = files_server
    alice = yield login(addr, "alice")
    carol = yield login(addr, "carol")
    r = yield call(alice, offer("bob", GOOD))
    alice.send_raw(data_frame(r["stream"], 0, GOOD))
    yield realm.delete_user("bob")
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    assert code(fin) == "no_such_user", fin
    kept = yield call(alice, {"type": "file_resume", "upload": r["upload"]})
    assert kept["offset"] == len(GOOD), kept
    yield call(carol, {"type": "create_group", "group": "#g"})
    yield call(alice, {"type": "join", "group": "#g"})
    g = yield call(alice, offer("#g", GOOD))
    alice.send_raw(data_frame(g["stream"], 0, GOOD))
    yield call(alice, {"type": "leave", "group": "#g"})
    fin = yield call(alice, {"type": "file_finish", "upload": g["upload"]})
    assert code(fin) == "not_member", fin
    yield call(alice, {"type": "join", "group": "#g"})
    fin = yield call(alice, {"type": "file_finish", "upload": g["upload"]})
    assert fin["type"] == "result", fin
    assert [m["kind"] for m in msgs(alice) if m["kind"] == "file"] == ["file"]


@pytest_twisted.inlineCallbacks
def test_downloads_in_progress_on_one_connection_are_bounded(files_server: Any) -> Any:
    """A client that asks for download after download and reads none cannot make the
    realm hold a file open (and a block read ahead) for each: past 16 in progress on
    one connection, limit_reached; a finished one frees its place."""
    import socket

    from tests.conftest import tcp_of

    _realm, addr = files_server
    alice = yield login(addr, "alice")
    data = bytes(range(256)) * 16
    r = yield call(alice, offer("alice", data))
    for i in range(0, len(data), CHUNK):
        alice.send_raw(data_frame(r["stream"], i, data[i : i + CHUNK]))
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    reader = yield login(addr, "alice", device="reader")
    tcp_of(reader.transport).getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    tcp_of(reader.transport).pauseProducing()  # reads nothing from now on
    for i in range(40):
        reader.send({"type": "download", "file": fin["file"], "id": f"d{i}"})
    tcp_of(reader.transport).resumeProducing()
    replies = []
    for i in range(40):
        rep = yield reader.reply(f"d{i}")
        replies.append(rep)
    granted = [rep for rep in replies if rep["type"] == "result"]
    refused = [rep for rep in replies if code(rep) == "limit_reached"]
    # Some may have finished (their bytes read) before later ones were asked for.
    assert len(granted) >= 16 and len(granted) + len(refused) == 40, replies
    assert refused, "40 downloads at once were all granted"
    # Once they are done, there is room again.
    yield until(
        lambda: (
            sum(len(f) - 14 for f in reader.frames if isinstance(f, bytes))
            >= len(granted) * len(data)
        )
    )
    again = yield call(reader, {"type": "download", "file": fin["file"]})
    assert again["type"] == "result", again


@pytest_twisted.inlineCallbacks
def test_upload_data_on_a_download_stream(files_server: Any) -> Any:
    """Upload data sent on the stream of one of the connection's downloads is for no
    upload: no_such_upload (with `stream`), the connection stays."""
    _realm, addr = files_server
    alice = yield login(addr, "alice")
    r = yield call(alice, offer("alice", GOOD))
    alice.send_raw(data_frame(r["stream"], 0, GOOD))
    fin = yield call(alice, {"type": "file_finish", "upload": r["upload"]})
    d = yield call(alice, {"type": "download", "file": fin["file"]})
    alice.send_raw(data_frame(d["stream"], 0, b"x"))
    e = yield wait_for(alice, lambda f: f.get("code") == "no_such_upload" and "id" not in f)
    assert e["stream"] == d["stream"]
    ok = yield call(alice, {"type": "ping"})
    assert ok["type"] == "result" and not alice.lost.called
