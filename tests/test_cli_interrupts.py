"""``chatproto send-file`` / ``download`` interrupted (Ctrl-C, a lost connection) at
every stage, against a real realm on a loopback socket.

The command runs as a subprocess; the realm runs in the test process, where a *gate*
holds it at the point under test (an offer not answered yet, bytes not acknowledged,
a ``file_finish`` not answered, a download paused after its first megabyte) while the
test sends SIGINT (or cuts the connection).  Then the gate opens and the test checks
what the command said against what the realm holds: the byte count of the upload,
whether the file was posted, the ``.part`` file's size.  Finally the command the
report names is run, and the recipient sees the file exactly once, byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import defer
from twisted.internet import reactor as _reactor

from chatproto import client
from chatproto.protocol import ClientFactory
from tests.conftest import drop_sessions, until
from tests.test_cli import PASSWORD, _register, run_cli, spawn

MiB = 1024 * 1024
#: What a clean interruption never prints.
NOISE = ("Traceback", "Exception ignored", "GeneratorExit", "negative integer", "Unhandled")


@pytest.fixture
def served(realm: Any) -> Any:
    """(realm, factory, "tcp:127.0.0.1:PORT")."""
    factory = ClientFactory(realm)
    port = _reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield realm, factory, f"tcp:127.0.0.1:{port.getHost().port}"
    for proto in list(factory.connections):
        proto.transport.abortConnection()
    pytest_twisted.blockon(defer.maybeDeferred(port.stopListening))


class Gate:
    """Holds Deferreds of the realm until :meth:`open` (then passes them on)."""

    def __init__(self) -> None:
        self.is_open = False
        self.reached: defer.Deferred[None] = defer.Deferred()
        self._held: list[tuple[defer.Deferred[Any], defer.Deferred[Any]]] = []

    def hold(self, d: defer.Deferred[Any]) -> defer.Deferred[Any]:
        if not self.reached.called:
            self.reached.callback(None)
        if self.is_open:
            return d
        out: defer.Deferred[Any] = defer.Deferred()
        self._held.append((d, out))
        return out

    def open(self) -> None:
        self.is_open = True
        held, self._held = self._held, []
        for d, out in held:
            d.chainDeferred(out)


def _file(tmp_path: Path, size: int) -> tuple[Path, bytes]:
    data = os.urandom(size)
    path = tmp_path / "holiday.bin"
    path.write_bytes(data)
    return path, data


@defer.inlineCallbacks
def _files_posted(addr: str) -> Any:
    """The file items of alice's conversation with bob, as the realm holds them."""
    conn = yield client.connect(_reactor, addr, "bob", PASSWORD, device="check", ack=False)
    try:
        items = yield conn.history("alice")
    finally:
        yield conn.close()
    return [m for m in items if m["kind"] == "file"]


@defer.inlineCallbacks
def _noted(proc: Any, text: str) -> Any:
    """Wait until the command has written ``text`` on stderr (it saw the signal)."""
    yield until(lambda: text in proc.err.decode("utf-8", "replace"))


INTERRUPTING = "interrupted; stopping the transfer"


def _resume_command(err: str) -> list[str]:
    m = re.search(r"(?:Resume with|To find out \(it is never posted twice\)): (chatproto .*)$", err)
    assert m, err
    argv = shlex.split(m.group(1))
    assert argv[0] == "chatproto" and "--resume" in argv
    return argv[1:]


def _run_args(argv: list[str]) -> Any:
    """Run ``chatproto ARGV`` as the report printed it (its --server and --user)."""
    return run_cli(argv[argv.index("--server") + 1], argv[argv.index("--user") + 1], *argv)


@defer.inlineCallbacks
def _bob_gets_it_once(addr: str, data: bytes, tmp_path: Path) -> Any:
    [item] = yield _files_posted(addr)
    assert item["meta"]["sha256"] == hashlib.sha256(data).hexdigest()
    dest = tmp_path / "got.bin"
    out, err, code = yield run_cli(addr, "bob", "download", item["meta"]["file_id"], str(dest))
    assert code == 0, err
    assert dest.read_bytes() == data
    out, err, code = yield run_cli(addr, "bob", "history", "alice", "--json")
    assert out.count('"kind": "file"') == 1, out


# uploads --------------------------------------------------------------------------


@pytest_twisted.inlineCallbacks
def test_ctrl_c_before_the_offer_is_answered(served: Any, tmp_path: Path) -> Any:
    realm, _factory, addr = served
    yield _register(addr, "alice", "bob")
    path, data = _file(tmp_path, 2 * MiB)
    gate = Gate()
    offer = realm.files.offer
    realm.files.offer = lambda *a, **kw: gate.hold(offer(*a, **kw))
    proc = spawn(addr, "alice", "send-file", "bob", str(path))
    yield gate.reached
    proc.transport.signalProcess("INT")
    yield _noted(proc, INTERRUPTING)
    gate.open()
    _out, err, code = yield proc.ended
    assert code == 130, err
    assert "interrupted before any byte was sent; nothing was posted" in err
    assert not any(n in err for n in NOISE), err
    assert not realm.files.uploads  # cancelled
    assert not (yield _files_posted(addr))
    realm.files.offer = offer
    _out, err, code = yield run_cli(addr, "alice", "send-file", "bob", str(path))
    assert code == 0, err
    yield _bob_gets_it_once(addr, data, tmp_path)


@pytest_twisted.inlineCallbacks
def test_ctrl_c_in_the_middle_reports_what_the_realm_holds(served: Any, tmp_path: Path) -> Any:
    realm, _factory, addr = served
    yield _register(addr, "alice", "bob")
    path, data = _file(tmp_path, 24 * MiB)
    gate = Gate()
    write = realm.files.write
    received = [0]

    def held_write(user: str, upload: str, offset: int, chunk: bytes) -> Any:
        received[0] += len(chunk)
        d = write(user, upload, offset, chunk)
        return d if received[0] < MiB else gate.hold(d)  # the realm stops reading

    realm.files.write = held_write
    proc = spawn(addr, "alice", "send-file", "bob", str(path))
    yield gate.reached
    proc.transport.signalProcess("INT")
    yield _noted(proc, INTERRUPTING)
    gate.open()
    _out, err, code = yield proc.ended
    assert code == 130, err
    assert not any(n in err for n in NOISE), err
    [upload] = realm.files.uploads.values()
    m = re.search(r"the realm holds .* \((\d+) of (\d+) bytes\) of upload (\w+); nothing", err)
    assert m, err
    assert (int(m.group(1)), int(m.group(2)), m.group(3)) == (
        upload.offset,
        len(data),
        upload.upload_id,
    )
    assert 0 < upload.offset < len(data)
    assert not (yield _files_posted(addr))
    realm.files.write = write
    _out, err, code = yield _run_args(_resume_command(err))
    assert code == 0, err
    assert not realm.files.uploads
    yield _bob_gets_it_once(addr, data, tmp_path)


@pytest_twisted.inlineCallbacks
def test_ctrl_c_after_the_last_byte_waits_for_the_post(served: Any, tmp_path: Path) -> Any:
    """Ctrl-C while file_finish is unanswered: the realm posts it, the command says so
    (it does not claim a failure), and a resume posts nothing more."""
    realm, _factory, addr = served
    yield _register(addr, "alice", "bob")
    path, data = _file(tmp_path, 3 * MiB)
    gate = Gate()
    finish = realm.files.finish
    realm.files.finish = lambda *a: gate.hold(defer.succeed(None)).addCallback(lambda _: finish(*a))
    proc = spawn(addr, "alice", "send-file", "bob", str(path))
    yield gate.reached
    proc.transport.signalProcess("INT")
    yield _noted(proc, INTERRUPTING)
    gate.open()
    out, err, code = yield proc.ended
    assert code == 0, err
    assert "interrupted, but the realm had all the bytes: the file is posted" in err
    assert not any(n in err for n in NOISE), err
    [item] = yield _files_posted(addr)
    assert out.startswith(f"file={item['meta']['file_id']} id={item['msg_id']} pos={item['pos']}")
    yield _bob_gets_it_once(addr, data, tmp_path)


@pytest_twisted.inlineCallbacks
def test_connection_lost_before_the_finish_result(served: Any, tmp_path: Path) -> Any:
    """The realm posts the file but the answer is lost with the connection: the command
    says it may have been posted; the resume it names reports the post, and posts
    nothing more (it posted the file a second time)."""
    realm, factory, addr = served
    yield _register(addr, "alice", "bob")
    path, data = _file(tmp_path, 3 * MiB)
    gate = Gate()
    finish = realm.files.finish
    realm.files.finish = lambda *a: gate.hold(defer.succeed(None)).addCallback(lambda _: finish(*a))
    proc = spawn(addr, "alice", "send-file", "bob", str(path))
    yield gate.reached
    drop_sessions(factory, "alice@localhost")
    _out, err, code = yield proc.ended
    gate.open()
    yield until(lambda: not realm.files.uploads)  # posted now
    assert code == 1, err
    assert "was lost while the realm was finishing upload" in err and "may have been" in err
    assert not any(n in err for n in NOISE), err
    realm.files.finish = finish
    argv = _resume_command(err)
    out, err, code = yield _run_args(argv)
    assert code == 0, err
    assert "was posted already; nothing was sent again" in err
    [item] = yield _files_posted(addr)
    assert out.startswith(f"file={item['meta']['file_id']} id={item['msg_id']} pos={item['pos']}")
    out, err, code = yield _run_args(argv)  # and again: still one post
    assert code == 0, err
    yield _bob_gets_it_once(addr, data, tmp_path)


# downloads ------------------------------------------------------------------------


class _Throttle:
    """Stands between a download's producer and its consumer: passes ``limit`` bytes,
    then holds the producer paused (fires ``reached``)."""

    def __init__(self, consumer: Any, limit: int) -> None:
        self.consumer = consumer
        self.limit = limit
        self.passed = 0
        self.producer: Any = None
        self.reached: defer.Deferred[None] = defer.Deferred()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.producer = producer
        self.consumer.registerProducer(self, streaming)

    def unregisterProducer(self) -> None:
        self.consumer.unregisterProducer()

    def write(self, data: bytes) -> None:
        self.consumer.write(data)
        self.passed += len(data)
        if self.passed >= self.limit and not self.reached.called:
            self.producer.pauseProducing()
            self.reached.callback(None)

    def pauseProducing(self) -> None:
        self.producer.pauseProducing()

    def resumeProducing(self) -> None:
        if not self.reached.called:
            self.producer.resumeProducing()

    def stopProducing(self) -> None:
        self.producer.stopProducing()


@pytest_twisted.inlineCallbacks
def test_ctrl_c_during_a_download(served: Any, tmp_path: Path) -> Any:
    """Ctrl-C mid-download: 'interrupted ... run the same command to resume', status
    130, the .part file holds what the report says; the same command finishes it."""
    realm, _factory, addr = served
    yield _register(addr, "alice", "bob")
    path, data = _file(tmp_path, 8 * MiB)
    alice = yield client.connect(_reactor, addr, "alice", PASSWORD)
    result = yield alice.send_file("bob", str(path))
    yield alice.close()
    throttles: list[_Throttle] = []
    open_download = realm.files.open_download

    def throttled(*a: Any, **kw: Any) -> Any:
        def wrap(dl: Any) -> Any:
            start = dl.start

            def start_throttled(consumer: Any) -> Any:
                throttles.append(_Throttle(consumer, MiB))
                return start(throttles[-1])

            dl.start = start_throttled
            return dl

        return open_download(*a, **kw).addCallback(wrap)

    realm.files.open_download = throttled
    dest = tmp_path / "in" / "holiday.bin"
    dest.parent.mkdir()
    argv = ["download", result["file"], str(dest)]
    proc = spawn(addr, "bob", *argv)
    yield until(lambda: bool(throttles))
    yield throttles[0].reached
    part = Path(str(dest) + ".part")
    yield until(lambda: part.exists() and part.stat().st_size >= MiB)
    proc.transport.signalProcess("INT")
    _out, err, code = yield proc.ended
    assert code == 130, err
    assert not any(n in err for n in NOISE), err
    m = re.search(
        r"interrupted: .*holiday\.bin\.part holds ([\d.]+ \w+) of ([\d.]+ \w+); run "
        r"the same command to resume",
        err,
    )
    assert m, err
    size = part.stat().st_size
    from chatproto.display import human_size

    assert m.groups() == (human_size(size), human_size(len(data)))
    assert part.read_bytes() == data[:size] and not dest.exists()
    realm.files.open_download = open_download
    _out, err, code = yield run_cli(addr, "bob", *argv)
    assert code == 0, err
    assert dest.read_bytes() == data and not part.exists()
