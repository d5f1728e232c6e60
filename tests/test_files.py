"""The realm's file service (realm.files) without sockets: rules, storage, streaming.

A realm on a MemoryStore with time from a ``task.Clock``; disk work runs inline (no
threads), in a temporary data directory.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from chatproto.errors import ChatError
from chatproto.realm import RealmService
from chatproto.testing import make_test_realm
from chatproto.transfer import RangeProducer, inline
from tests.conftest import fast_config
from tests.conftest import fired as ok

ALICE, BOB, CAROL = "alice@localhost", "bob@localhost", "carol@localhost"


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def realm(tmp_path: Any, clock: Clock) -> RealmService:
    cfg = fast_config(tmp_path)
    cfg.files.max_file_size = 1_000_000
    cfg.files.quota_per_user = 2_000_000
    r = make_test_realm(clock, cfg)
    for name in ("alice", "bob", "carol"):
        r.create_user(name, "password1")
    return r


def code(d: Any) -> str:
    with pytest.raises(ChatError) as e:
        ok(d)
    return e.value.code


def upload(realm: RealmService, sender: str, to: str, data: bytes, name: str = "a.bin") -> Any:
    files = realm.files
    up = ok(files.offer(sender, to, name, len(data), hashlib.sha256(data).hexdigest()))
    for i in range(0, len(data), 1000):
        ok(files.write(sender, up.upload_id, i, data[i : i + 1000]))
    return ok(files.finish(sender, up.upload_id))


def fetch(
    realm: RealmService, user: str, file_id: str, offset: int = 0, length: Any = None
) -> bytes:
    dl = ok(realm.files.open_download(user, file_id, offset, length))
    t = StringTransport()
    n = ok(dl.start(t))
    assert n == len(t.value())
    assert t.producer is None  # unregistered at the end
    return bytes(t.value())


def test_upload_stores_file_posts_message_and_download_returns_bytes(realm: Any) -> None:
    data = os.urandom(300_000)
    info, env = upload(realm, ALICE, "bob", data, "photo.jpg")
    assert env.kind == "file" and env.pos > 0 and env.recipient == BOB
    assert env.meta["file_id"] == info.file_id and env.meta["size"] == len(data)
    assert realm.store.items[-1] is env  # in the stream like any message
    assert fetch(realm, BOB, info.file_id) == data
    assert fetch(realm, ALICE, info.file_id) == data  # the sender too
    assert fetch(realm, BOB, info.file_id, 1000, 5000) == data[1000:6000]
    assert fetch(realm, BOB, info.file_id, len(data)) == b""
    assert code(realm.files.open_download(BOB, info.file_id, 10, len(data))) == "bad_request"
    blob = realm.files.store.blob_path(info.sha256)
    with open(blob, "rb") as f:
        assert f.read() == data
    assert not realm.store.uploads  # the upload record is gone


def test_empty_file(realm: Any) -> None:
    info, _ = upload(realm, ALICE, "bob", b"")
    assert info.size == 0
    assert fetch(realm, BOB, info.file_id) == b""


def test_same_content_is_stored_once(realm: Any) -> None:
    data = b"x" * 5000
    a, _ = upload(realm, ALICE, "bob", data)
    b, _ = upload(realm, CAROL, "alice", data, "copy.bin")
    assert a.file_id != b.file_id and a.sha256 == b.sha256
    blobs = ok(realm.files.store.list_blobs())
    assert blobs == [a.sha256]


def test_limits_are_checked_before_any_byte(realm: Any) -> None:
    files = realm.files
    sha = "0" * 64
    e = code(files.offer(ALICE, "bob", "big", 1_000_001, sha))
    assert e == "too_large"
    ok(files.offer(ALICE, "bob", "one", 1_000_000, sha))
    ok(files.offer(ALICE, "bob", "two", 1_000_000, sha))
    with pytest.raises(ChatError) as err:
        ok(files.offer(ALICE, "bob", "three", 1, sha))
    assert err.value.code == "quota_exceeded"
    assert err.value.extra == {"quota": 2_000_000, "used": 2_000_000}
    assert not os.path.exists(files.store.root)  # nothing was written
    assert code(files.offer(ALICE, "nobody", "x", 1, sha)) == "no_such_user"
    assert code(files.offer(ALICE, "#nogroup", "x", 1, sha)) == "no_such_group"
    assert code(files.offer(ALICE, "bob", "a/b", 1, sha)) == "bad_request"
    assert code(files.offer(ALICE, "bob", "x", -1, sha)) == "bad_request"
    assert code(files.offer(ALICE, "bob", "x", 1, "zz")) == "bad_request"
    assert code(files.offer(ALICE, "bob", "x", 1, sha, "not a type")) == "bad_request"


def test_quota_counts_stored_files(realm: Any) -> None:
    realm.config.files.quota_per_user = 10_000
    upload(realm, ALICE, "bob", b"y" * 6000)
    assert code(realm.files.offer(ALICE, "bob", "x", 5000, "0" * 64)) == "quota_exceeded"
    ok(realm.files.offer(BOB, "alice", "x", 5000, "0" * 64))  # bob has his own quota


def test_unfinished_uploads_per_user_are_bounded(realm: Any) -> None:
    realm.config.files.max_uploads_per_user = 2
    for _ in range(2):
        ok(realm.files.offer(ALICE, "bob", "x", 1, "0" * 64))
    assert code(realm.files.offer(ALICE, "bob", "x", 1, "0" * 64)) == "limit_reached"


def test_offsets_must_continue_and_size_is_enforced(realm: Any) -> None:
    files = realm.files
    up = ok(files.offer(ALICE, "bob", "x", 10, hashlib.sha256(b"0123456789").hexdigest()))
    ok(files.write(ALICE, up.upload_id, 0, b"0123"))
    with pytest.raises(ChatError) as e:
        ok(files.write(ALICE, up.upload_id, 2, b"23"))
    assert e.value.code == "bad_offset" and e.value.extra["offset"] == 4
    assert code(files.write(ALICE, up.upload_id, 4, b"4567890")) == "too_large"
    assert code(files.finish(ALICE, up.upload_id)) == "incomplete"
    assert code(files.write(BOB, up.upload_id, 4, b"45")) == "no_such_upload"  # not his
    assert ok(files.status(ALICE, up.upload_id)).offset == 4
    ok(files.write(ALICE, up.upload_id, 4, b"456789"))
    info, env = ok(files.finish(ALICE, up.upload_id))
    assert fetch(realm, BOB, info.file_id) == b"0123456789"
    # asked again (the answer was lost): the same post, not a second one
    assert ok(files.finish(ALICE, up.upload_id)) == (info, env)
    assert files.posted(ALICE, up.upload_id) == (info, env)
    assert files.posted(BOB, up.upload_id) is None  # not his
    assert code(files.finish(BOB, up.upload_id)) == "no_such_upload"
    assert [i.kind for i in realm.store.items].count("file") == 1


def test_a_finish_asked_again_while_it_runs_gets_the_same_post(realm: Any, clock: Clock) -> None:
    """Two file_finish for one upload (a retry on another connection while the first
    runs): one file item; both get it.  Forgotten an upload_expiry later."""
    files = realm.files
    data = b"0123456789"
    up = ok(files.offer(ALICE, "bob", "x", 10, hashlib.sha256(data).hexdigest()))
    ok(files.write(ALICE, up.upload_id, 0, data))
    gate: Any = Deferred()
    real_commit = files.store.commit
    files.store.commit = lambda *a: gate.addCallback(lambda _: real_commit(*a))
    first, second = files.finish(ALICE, up.upload_id), files.finish(ALICE, up.upload_id)
    assert not first.called and not second.called
    gate.callback(None)
    assert ok(first) == ok(second)
    assert [i.kind for i in realm.store.items].count("file") == 1
    clock.advance(realm.config.files.upload_expiry)
    ok(files.cleanup())
    assert files.posted(ALICE, up.upload_id) is None
    assert code(files.finish(ALICE, up.upload_id)) == "no_such_upload"


def test_checksum_mismatch_stores_nothing(realm: Any) -> None:
    files = realm.files
    up = ok(files.offer(ALICE, "bob", "x", 4, hashlib.sha256(b"abcd").hexdigest()))
    ok(files.write(ALICE, up.upload_id, 0, b"abce"))
    before = len(realm.store.items)
    assert code(files.finish(ALICE, up.upload_id)) == "checksum_mismatch"
    assert len(realm.store.items) == before  # no message
    assert not os.path.exists(files.store.part_path(up.upload_id))
    assert ok(files.store.list_blobs()) == []
    assert code(files.status(ALICE, up.upload_id)) == "no_such_upload"


def test_cancel_discards_the_upload(realm: Any) -> None:
    files = realm.files
    up = ok(files.offer(ALICE, "bob", "x", 4, "0" * 64))
    ok(files.write(ALICE, up.upload_id, 0, b"ab"))
    assert code(files.cancel(BOB, up.upload_id)) == "no_such_upload"
    ok(files.cancel(ALICE, up.upload_id))
    assert not os.path.exists(files.store.part_path(up.upload_id))
    assert code(files.write(ALICE, up.upload_id, 2, b"cd")) == "no_such_upload"
    assert not realm.store.uploads


def test_only_the_parties_and_members_may_download(realm: Any) -> None:
    info, _ = upload(realm, ALICE, "bob", b"private")
    assert code(realm.files.open_download(CAROL, info.file_id)) == "no_such_file"
    assert code(realm.files.open_download(BOB, "no-such-file-id-at-all")) == "no_such_file"
    ok(realm.group_event_as("alice", "created", "#team"))
    assert code(realm.files.offer(BOB, "#team", "x", 1, "0" * 64)) == "not_member"
    ok(realm.group_event_as("bob", "joined", "#team"))
    ginfo, env = upload(realm, ALICE, "#team", b"for the team")
    assert env.recipient == "#team@localhost"
    assert fetch(realm, BOB, ginfo.file_id) == b"for the team"
    assert code(realm.files.open_download(CAROL, ginfo.file_id)) == "no_such_file"
    # joining later: under the default history rule the file predates carol
    ok(realm.group_event_as("carol", "joined", "#team"))
    assert code(realm.files.open_download(CAROL, ginfo.file_id)) == "no_such_file"
    ok(realm.group_event_as("bob", "left", "#team"))
    assert code(realm.files.open_download(BOB, ginfo.file_id)) == "no_such_file"


def test_retention_removes_expired_files_and_unreferenced_blobs(realm: Any, clock: Clock) -> None:
    old, _ = upload(realm, ALICE, "bob", b"old content")
    shared_old, _ = upload(realm, ALICE, "bob", b"shared")
    clock.advance(20 * 86400)
    shared_new, _ = upload(realm, BOB, "alice", b"shared")
    idle = ok(realm.files.offer(ALICE, "bob", "idle", 5, "0" * 64))
    ok(realm.files.write(ALICE, idle.upload_id, 0, b"ab"))
    clock.advance(11 * 86400)  # old ones are 31 days old; the idle upload 11 days
    assert realm.files._cleanup.running
    clock.advance(realm.config.files.cleanup_interval)  # the periodic pass runs
    assert code(realm.files.open_download(BOB, old.file_id)) == "no_such_file"
    assert code(realm.files.open_download(BOB, shared_old.file_id)) == "no_such_file"
    assert fetch(realm, ALICE, shared_new.file_id) == b"shared"  # blob kept: still used
    assert ok(realm.files.store.list_blobs()) == [shared_new.sha256]
    assert code(realm.files.status(ALICE, idle.upload_id)) == "no_such_upload"
    assert not os.path.exists(realm.files.store.part_path(idle.upload_id))
    # the file messages stay in the history
    assert [e.kind for e in realm.store.items].count("file") == 3


def test_cleanup_removes_orphaned_blobs(realm: Any) -> None:
    path = realm.files.store.blob_path("ab" * 32)
    os.makedirs(os.path.dirname(path))
    with open(path, "wb") as f:
        f.write(b"left by a crash")
    assert ok(realm.files.cleanup()) == {"uploads": 0, "blobs": 1}
    assert not os.path.exists(path)


def test_range_producer_stops_reading_while_paused(tmp_path: Any) -> None:
    path = tmp_path / "f"
    data = os.urandom(10 * 4096)
    path.write_bytes(data)
    reads: list[int] = []

    def counting(fn: Any, *args: Any) -> Any:
        reads.append(args[1] if len(args) > 1 else 0)
        return inline(fn, *args)

    t = StringTransport()
    p = RangeProducer(counting, str(path), 0, len(data), block=4096)
    p.pauseProducing()
    d = p.start(t)
    assert t.value() == b"" and len(reads) == 1  # one block prefetched, nothing sent
    p.resumeProducing()
    assert ok(d) == len(data) and t.value() == data and len(reads) == 10


def test_file_records_survive_in_sqlite(tmp_path: Any) -> None:
    from chatproto.envelope import Envelope
    from chatproto.store.sqlite import SQLiteDB

    db = SQLiteDB(str(tmp_path / "db.sqlite3"))
    db.migrate()
    meta = {"file_id": "f" * 24, "sha256": "a" * 64, "size": 3, "name": "n", "media_type": "a/b"}
    env = Envelope("m1", "file", ALICE, BOB, 5.0, "n", meta)
    [[pos]] = db.append_batch([[env]], {})
    rec = db.file_info("f" * 24)
    assert rec == {**meta, "sender": ALICE, "recipient": BOB, "ts": 5.0, "pos": pos}
    assert db.file_usage(ALICE) == 3 and db.blob_referenced("a" * 64)
    db.put_upload({"upload_id": "u1", "user": ALICE, "size": 9})
    assert db.list_uploads() == [{"upload_id": "u1", "user": ALICE, "size": 9}]
    db.delete_upload("u1")
    assert db.list_uploads() == []
    assert db.expire_files(4.0) == []
    assert db.expire_files(6.0) == ["a" * 64]
    assert db.file_info("f" * 24) is None and db.file_usage(ALICE) == 0


def test_new_ids_are_hex_and_never_look_like_a_command_line_option() -> None:
    from chatproto.files import _ID, _new_id

    ids = {_new_id() for _ in range(500)}
    assert len(ids) == 500
    assert all(len(i) == 32 and int(i, 16) >= 0 and _ID.fullmatch(i) for i in ids)


class _Slow(StringTransport):
    """A consumer that takes one write, then stops reading (pauses its producer)."""

    def write(self, data: bytes) -> None:
        super().write(data)
        self.producer.pauseProducing()


def test_downloads_of_files_that_expire_stop_with_no_such_file(realm: Any, clock: Clock) -> None:
    """Retention's clean-up forgot expired files and removed their bytes while their
    downloads in progress kept streaming them (from the open file) to the end, and a
    download opened before and started after streamed them too.  Now both end with
    no_such_file and no more of the bytes are read; a download of a file that did not
    expire goes on."""
    from chatproto.transfer import BLOCK

    data = os.urandom(3 * BLOCK)
    old, _ = upload(realm, ALICE, "bob", data)
    clock.advance(29 * 86400)
    new, _ = upload(realm, ALICE, "bob", data[::-1])
    streaming = ok(realm.files.open_download(BOB, old.file_id))
    opened = ok(realm.files.open_download(ALICE, old.file_id))
    going_on = ok(realm.files.open_download(BOB, new.file_id))
    t, t_new = _Slow(), _Slow()
    d = streaming.start(t)
    d_new = going_on.start(t_new)
    assert t.value() == data[:BLOCK] and not d.called  # one block sent, paused
    clock.advance(2 * 86400)  # old is 31 days old: expired
    ok(realm.files.cleanup())
    assert code(d) == "no_such_file"
    assert t.producer is None  # stopped: nothing more is read or written
    assert t.value() == data[:BLOCK]
    assert code(opened.start(StringTransport())) == "no_such_file"
    assert set(realm.files.downloads) == {new.file_id}
    for _ in range(2):  # the two blocks left (each write pauses it again)
        t_new.producer.resumeProducing()
    assert ok(d_new) == len(data) and t_new.value() == data[::-1]
    assert not realm.files.downloads


def test_recheck_stops_the_downloads_of_files_deleted_elsewhere(realm: Any) -> None:
    """Another worker of the realm deleted a file (its record is gone from the shared
    store): ``recheck`` stops the downloads of it in progress here, with
    no_such_file, and leaves the others alone."""
    from chatproto.transfer import BLOCK

    gone, _ = upload(realm, ALICE, "bob", os.urandom(2 * BLOCK))
    kept, _ = upload(realm, ALICE, "bob", os.urandom(2 * BLOCK))
    t, t_kept = _Slow(), _Slow()
    d = ok(realm.files.open_download(BOB, gone.file_id)).start(t)
    d_kept = ok(realm.files.open_download(BOB, kept.file_id)).start(t_kept)
    del realm.store.files[gone.file_id]  # (what the other worker's delete did)
    ok(realm.files.recheck())
    assert code(d) == "no_such_file" and len(t.value()) == BLOCK
    assert not d_kept.called and set(realm.files.downloads) == {kept.file_id}


def open_download_held(realm: Any, info: Any) -> tuple[Deferred[Any], Deferred[Any]]:
    """bob opens a download of ``info`` while the store's look for its blob on disk
    is held.  Returns the opening and the held look (fire it with True: the blob was
    there when asked)."""
    run = realm.files.store.run
    held: list[Deferred[Any]] = []

    def holding(fn: Any, *args: Any) -> Any:
        held.append(Deferred())
        return held[-1]

    realm.files.store.run = holding
    opening = realm.files.open_download(BOB, info.file_id)
    assert len(held) == 1 and not opening.called  # (is the blob there)
    realm.files.store.run = run
    return opening, held[0]


def test_recheck_also_stops_a_download_being_opened(realm: Any) -> None:
    """A download being opened on this worker (its record read, its bytes looked
    for on disk) when another worker's delete is routed here: the recheck looked at
    the downloads already open only, so this one was handed out after it and
    streamed the deleted file.  Now it is no_such_file."""
    info, _ = upload(realm, ALICE, "bob", b"some bytes")
    opening, held = open_download_held(realm, info)
    del realm.store.files[info.file_id]  # (what the other worker's delete did)
    ok(realm.files.recheck())
    held.callback(True)  # it was, when asked
    assert code(opening) == "no_such_file" and not realm.files.downloads


def test_a_blob_removed_while_its_download_is_opened_is_no_such_file(realm: Any) -> None:
    """The clean-up removed an orphaned blob (its file deleted by another worker)
    while a download of it was being opened here, after its bytes were found on
    disk: the download was handed out and its start failed on the missing file
    (FileNotFoundError) instead of no_such_file.  Now the bytes are opened before it
    is handed out: gone, it is no_such_file."""
    info, _ = upload(realm, ALICE, "bob", b"some bytes")
    opening, held = open_download_held(realm, info)
    os.unlink(realm.files.store.blob_path(info.sha256))  # (the clean-up, meanwhile)
    held.callback(True)  # it was, when asked
    assert code(opening) == "no_such_file" and not realm.files.downloads


def test_a_download_handed_out_reads_the_bytes_it_was_opened_on(realm: Any) -> None:
    """A download handed out holds its file's bytes open: removed from the directory
    before it starts (nothing withdrew the download), it still sends them all, where
    it failed on the missing file before."""
    data = os.urandom(10_000)
    info, _ = upload(realm, ALICE, "bob", data)
    fds = len(os.listdir("/proc/self/fd"))
    ok(realm.files.open_download(BOB, info.file_id)).close()  # given up unstarted
    assert len(os.listdir("/proc/self/fd")) == fds  # the blob's fd with it
    dl = ok(realm.files.open_download(BOB, info.file_id))
    os.unlink(realm.files.store.blob_path(info.sha256))
    t = StringTransport()
    assert ok(dl.start(t)) == len(data) and t.value() == data
    assert not realm.files.downloads
    assert len(os.listdir("/proc/self/fd")) == fds


def test_a_download_its_consumer_refuses_is_not_left_in_progress(realm: Any) -> None:
    """``start`` on a consumer that refuses the producer (a twisted.web request whose
    connection is gone has no channel any more) raised and left the download among
    its file's downloads in progress for good."""
    info, _ = upload(realm, ALICE, "bob", b"some bytes")

    class Gone(StringTransport):
        def registerProducer(self, producer: Any, streaming: bool) -> None:
            raise AttributeError("'NoneType' object has no attribute 'registerProducer'")

    fds = len(os.listdir("/proc/self/fd"))
    dl = ok(realm.files.open_download(BOB, info.file_id))
    with pytest.raises(AttributeError):
        dl.start(Gone())
    assert not realm.files.downloads
    assert len(os.listdir("/proc/self/fd")) == fds  # the blob's, opened for it, is closed
