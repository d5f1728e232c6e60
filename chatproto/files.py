"""Files: the realm's file service (the rules) and its content-addressed blob store.

:class:`FileService` is ``realm.files``, the file part of the realm service and the
only place with rules about files: size limits and quotas are checked when a file is
*offered*, before any byte moves; the sha256 is verified before anything is stored;
only a conversation's parties (a group's members) may download; files expire after
the configured retention.  It speaks no protocol: the native protocol
(:mod:`chatproto.protocol`), the web gateway and federation call the same methods with
the canonical address of a user they have authenticated.

Bytes live in a :class:`FileStore` on disk under ``<data_dir>/files``: one blob per
content (``blobs/<sha[:2]>/<sha256>``, so the same content is stored once) and one
partial file per unfinished upload (``uploads/<upload_id>.part``).  Metadata lives in
the :class:`chatproto.store.IStore`: a finished file is a stream item of kind ``file``
whose ``meta`` describes it (the store records the file with its message, atomically),
and unfinished uploads are recorded so they survive a restart.  Disk I/O and hashing
run in threads (:mod:`chatproto.transfer`), never on the reactor thread.

An upload: :meth:`FileService.offer` -> :meth:`FileService.write` (at the current
offset, repeatedly; after a dropped connection :meth:`FileService.status` says where
to continue) -> :meth:`FileService.finish` (verify, store, post the message), or
:meth:`FileService.cancel`.  A download: :meth:`FileService.open_download` gives a
:class:`Download` whose :meth:`Download.start` feeds a byte range to any consumer.
"""

from __future__ import annotations

import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
from twisted.internet.defer import Deferred, DeferredLock, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IConsumer, IReactorThreads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproto.config import Files as FilesConfig
from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.ops.stats import RealmStats
from chatproto.text import check_label
from chatproto.transfer import RangeProducer, Runner, SerialWriter, ThreadRunner, inline

if TYPE_CHECKING:
    from chatproto.realm import RealmService

__all__ = [
    "Download",
    "FileInfo",
    "FileService",
    "FileStore",
    "RemoteBlob",
    "Upload",
    "announced_limits",
    "finish_result",
    "new_file_id",
]

MAX_NAME = 255
#: Finished uploads remembered (the newest, for ``upload_expiry`` seconds, in memory),
#: so a client that lost the answer to ``file_finish`` learns it again instead of
#: posting the file a second time.
FINISHED_REMEMBERED = 4096
DEFAULT_MEDIA_TYPE = "application/octet-stream"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_TOKEN = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,63}"
_MEDIA_TYPE = re.compile(f"{_TOKEN}/{_TOKEN}")
_ID = re.compile(r"[A-Za-z0-9_-]{16,64}")


def _new_id() -> str:
    """An unguessable id (file and upload ids also appear in web links and on command
    lines, so hex: never starting with ``-``, which a shell command takes for an option)."""
    return secrets.token_hex(16)


def new_file_id() -> str:
    """A fresh file id (federation: for a file from another realm whose own id is held
    here by another file)."""
    return _new_id()


@attrs.define(frozen=True)
class FileInfo:
    """A stored file as recipients see it (its ``file`` message's ``meta`` plus
    who sent it where, and the message's position)."""

    file_id: str
    sha256: str
    size: int
    name: str
    media_type: str
    sender: str
    recipient: str
    ts: float
    pos: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "file": self.file_id,
            "name": self.name,
            "size": self.size,
            "media_type": self.media_type,
            "sha256": self.sha256,
            "from": self.sender,
            "to": self.recipient,
            "ts": self.ts,
            "pos": self.pos,
        }


@attrs.define(eq=False)
class Upload:
    """An unfinished upload (see :meth:`FileService.offer`).

    ``offset`` is how many bytes the realm has on disk; ``accepted`` counts bytes
    accepted by :meth:`FileService.write` (``accepted - offset`` are being written).
    """

    upload_id: str
    user: str
    to: str
    name: str
    size: int
    media_type: str
    sha256: str
    created: float
    writer: SerialWriter
    accepted: int = 0
    touched: float = 0.0
    finishing: bool = False

    @property
    def offset(self) -> int:
        return self.writer.offset

    def record(self) -> dict[str, Any]:
        return {
            "upload_id": self.upload_id,
            "user": self.user,
            "to": self.to,
            "name": self.name,
            "size": self.size,
            "media_type": self.media_type,
            "sha256": self.sha256,
            "created": self.created,
        }

    def to_wire(self) -> dict[str, Any]:
        return {
            "upload": self.upload_id,
            "to": self.to,
            "name": self.name,
            "size": self.size,
            "media_type": self.media_type,
            "sha256": self.sha256,
            "offset": self.offset,
        }


class FileStore:
    """Content-addressed blobs and partial uploads in one directory.

    Every method that touches the disk returns a Deferred and runs through ``run``.
    Directories are created on first use, so a realm that never sees a file has none.
    """

    def __init__(self, root: str, run: Runner) -> None:
        self.root = root
        self.run = run

    def blob_path(self, sha256: str) -> str:
        return os.path.join(self.root, "blobs", sha256[:2], sha256)

    def part_path(self, upload_id: str) -> str:
        return os.path.join(self.root, "uploads", upload_id + ".part")

    def part_size(self, upload_id: str) -> Deferred[int]:
        def size() -> int:
            try:
                return os.stat(self.part_path(upload_id)).st_size
            except FileNotFoundError:
                return 0

        return self.run(size)

    def discard(self, upload_id: str) -> Deferred[None]:
        def remove() -> None:
            try:
                os.unlink(self.part_path(upload_id))
            except FileNotFoundError:
                pass

        return self.run(remove)

    def commit(self, upload_id: str, sha256: str) -> Deferred[bool]:
        """Make a verified upload the blob of its content: fsync it and rename it into
        place, or drop it when that content is stored already.  Fires with True when a
        new blob was created."""

        def commit() -> bool:
            part = self.part_path(upload_id)
            blob = self.blob_path(sha256)
            if not os.path.exists(part):  # an empty file never had a write
                os.makedirs(os.path.dirname(part), exist_ok=True)
                open(part, "wb").close()
            if os.path.exists(blob):
                os.unlink(part)
                return False
            fd = os.open(part, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            parent = os.path.dirname(blob)
            os.makedirs(parent, exist_ok=True)
            os.replace(part, blob)
            dfd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
            return True

        return self.run(commit)

    def has_blob(self, sha256: str) -> Deferred[bool]:
        return self.run(os.path.exists, self.blob_path(sha256))

    def open_blob(self, sha256: str) -> Deferred[int]:
        """A file descriptor of the blob, open for reading: its bytes stay readable
        through it when the blob is removed (fails with FileNotFoundError if it is
        gone already)."""
        return self.run(os.open, self.blob_path(sha256), os.O_RDONLY)

    def remove_blobs(self, digests: list[str]) -> Deferred[int]:
        def remove() -> int:
            n = 0
            for sha in digests:
                try:
                    os.unlink(self.blob_path(sha))
                    n += 1
                except FileNotFoundError:
                    pass
            return n

        return self.run(remove)

    def list_parts(self) -> Deferred[list[str]]:
        """The upload ids with a partial file."""

        def scan() -> list[str]:
            try:
                names = os.listdir(os.path.join(self.root, "uploads"))
            except FileNotFoundError:
                return []
            return sorted(n[: -len(".part")] for n in names if n.endswith(".part"))

        return self.run(scan)

    def list_blobs(self) -> Deferred[list[str]]:
        def walk() -> list[str]:
            out = []
            base = os.path.join(self.root, "blobs")
            for d in sorted(os.listdir(base)) if os.path.isdir(base) else ():
                for name in sorted(os.listdir(os.path.join(base, d))):
                    if _SHA256.fullmatch(name):
                        out.append(name)
            return out

        return self.run(walk)


class Download:
    """A permitted byte range of a stored file, ready to be streamed.

    :meth:`start` feeds ``[offset, offset + length)`` to an ``IConsumer`` (a transport,
    a ``twisted.web`` request, a :class:`chatproto.transfer.DataSink`) as a streaming
    producer reading one block at a time in a thread, so memory stays bounded however
    slowly the consumer reads.  It fires with the byte count once all are written.

    From the moment the realm's files hand it out (:meth:`FileService.open_download`,
    :meth:`FileService.serve_remote`) until it ends (all written, stopped by its
    consumer, or given up unstarted with :meth:`close`) it is one of its file's
    downloads in progress: if the file is deleted meanwhile
    (:meth:`FileService.withdraw`), no more of its bytes are read or written and
    :meth:`start`'s Deferred fails with ``ChatError("no_such_file")`` ("file F was
    deleted"), at once or when it is started.  Whoever gets a Download calls
    :meth:`start` or :meth:`close`.
    """

    def __init__(
        self,
        store: FileStore,
        info: FileInfo,
        offset: int,
        length: int,
        stats: RealmStats | None = None,
        ended: Callable[[], None] | None = None,
        fd: int | None = None,
    ) -> None:
        """``fd``: the blob opened for reading (see :meth:`FileStore.open_blob`),
        which the Download then owns (its producer, or :meth:`close`, closes it); else
        the blob is opened when the first block is read."""
        self.info = info
        self.offset = offset
        self.length = length
        self._store = store
        self._stats = stats
        self._ended = ended
        self._producer: RangeProducer | None = None
        self._withdrawn: ChatError | None = None
        self._fd = fd

    def start(self, consumer: IConsumer) -> Deferred[int]:
        if self._withdrawn is not None:
            self.close()
            return fail(self._withdrawn)
        if self._producer is not None:
            raise RuntimeError("a Download is started once")
        path = self._store.blob_path(self.info.sha256)
        fd, self._fd = self._fd, None  # the producer's from now on
        producer = self._producer = RangeProducer(
            self._store.run, path, self.offset, self.length, fd=fd
        )
        try:
            d = producer.start(consumer)
        except BaseException:  # the consumer refused the producer (a request gone)
            producer.refused()
            self.close()
            raise
        stats = self._stats

        def ended(result: Any) -> Any:
            if stats is not None:
                stats.file_bytes_out += producer.sent  # what was sent, finished or not
            self.close()
            return result

        return d.addBoth(ended)

    def close(self) -> None:
        """This download is over (or will not be started): it stops counting among its
        file's downloads in progress.  Idempotent; it does not stop a started one (its
        consumer does, with ``stopProducing``)."""
        fd, self._fd = self._fd, None
        if fd is not None:  # never started: its producer did not take the blob's fd
            os.close(fd)
        ended, self._ended = self._ended, None
        if ended is not None:
            ended()

    def withdraw(self) -> None:
        """Its file was deleted (see :meth:`FileService.withdraw`): stop, or never
        start, with ``no_such_file``."""
        if self._withdrawn is not None:
            return
        self._withdrawn = ChatError("no_such_file", f"file {self.info.file_id} was deleted")
        if self._producer is not None:
            self._producer.stop(self._withdrawn)


class _Opening:
    """A download being opened (its file's record read, not yet handed out)."""

    withdrawn = False


class FileService:
    """The realm's files: ``realm.files`` (see the module docstring).

    Every method takes ``user``, the canonical address (``alice@realm``) of the local
    user the caller has authenticated, and checks that user's rights.  Methods return
    Deferreds that fail with :class:`chatproto.errors.ChatError` (codes in
    PROTOCOL.md).  Nothing here blocks the reactor.
    """

    log = Logger()

    def __init__(self, realm: RealmService, root: str, run: Runner | None = None) -> None:
        self.realm = realm
        self.config: FilesConfig = realm.config.files
        self._runner: ThreadRunner | None = None
        if run is None:
            if IReactorThreads.providedBy(realm.reactor):
                run = self._runner = ThreadRunner(realm.reactor)
            else:  # a task.Clock in tests: no threads
                run = inline
        self.store = FileStore(root, run)
        self.uploads: dict[str, Upload] = {}
        #: upload id -> (user, when, info, envelope) of recently finished uploads
        self.finished: OrderedDict[str, tuple[str, float, FileInfo, Envelope]] = OrderedDict()
        #: upload id -> Deferreds of file_finish requests waiting for a running finish
        self._finishing: dict[str, list[Deferred[Any]]] = {}
        #: Offers are checked one at a time, so two cannot both pass one quota check.
        self._offer_lock = DeferredLock()
        #: Blob creation (with its message) and blob removal never interleave.
        self._blob_lock = DeferredLock()
        self._cleanup = LoopingCall(self.cleanup)
        self._cleanup.clock = realm.clock
        #: file id -> its downloads in progress (every :class:`Download` handed out,
        #: to clients and peers, until it ends; see :meth:`withdraw`)
        self.downloads: dict[str, set[Download]] = {}
        #: file id -> its downloads being opened (see :meth:`_open`)
        self._opening: dict[str, set[_Opening]] = {}
        #: Files recorded before this are expired (see :meth:`cleanup`).
        self._expired_before = float("-inf")

    # lifecycle ----------------------------------------------------------------------

    @inlineCallbacks
    def start(self) -> Any:
        """Reload unfinished uploads (their offsets from the partial files), discard
        partial files no upload record names (an account deleted by ``chatrealmctl``
        takes its upload records with it) and start the periodic clean-up."""
        now = self.realm.clock.seconds()
        for rec in (yield self.realm.store.list_uploads()):
            up = self._upload(rec)
            up.writer.offset = up.accepted = yield self.store.part_size(up.upload_id)
            up.touched = now
            self.uploads[up.upload_id] = up
        for upload_id in (yield self.store.list_parts()):
            if upload_id not in self.uploads:
                self.log.info("partial file of upload {id} discarded: no record", id=upload_id)
                yield self.store.discard(upload_id)
        self._cleanup.start(self.config.cleanup_interval, now=False)

    @inlineCallbacks
    def stop(self) -> Any:
        if self._cleanup.running:
            self._cleanup.stop()
        for up in list(self.uploads.values()):
            yield up.writer.drained()
        if self._runner is not None:
            self._runner.stop()

    def limits(self) -> dict[str, int]:
        """The limits announced in ``hello``."""
        return announced_limits(self.config)

    # uploads ------------------------------------------------------------------------

    def offer(
        self,
        user: str,
        to: str,
        name: str,
        size: int,
        sha256: str,
        media_type: str | None = None,
    ) -> Deferred[Upload]:
        """Start an upload of ``size`` bytes named ``name`` from ``user`` to ``to`` (a
        user or ``#group``).  Fires with the :class:`Upload` (``upload_id``, ``offset``
        0) once recorded.

        Checked here, before any byte moves: the fields (``bad_request``), the size
        (``too_large`` with ``limit``), the recipient (``no_such_user``,
        ``not_member``...), the number of unfinished uploads (``limit_reached``) and
        the quota: stored files plus unfinished uploads plus this one
        (``quota_exceeded`` with ``quota`` and ``used``).
        """
        try:
            name, sha256, media_type = self._check_offer(name, size, sha256, media_type)
            recipient = self._recipient(user, to)
        except ChatError as e:
            return fail(e)

        @inlineCallbacks
        def check(to_addr: str) -> Any:
            mine = [u for u in self.uploads.values() if u.user == user]
            if len(mine) >= self.config.max_uploads_per_user:
                raise ChatError(
                    "limit_reached",
                    f"at most {self.config.max_uploads_per_user} unfinished uploads",
                )
            floor = yield self.realm.account_floor(user)
            stored = yield self.realm.store.file_usage(user, floor or 0)
            used = stored + sum(u.size for u in mine)
            quota = self.config.quota_per_user
            if used + size > quota:
                raise ChatError(
                    "quota_exceeded",
                    f"{size} more bytes would exceed your quota ({used} of {quota} used)",
                    quota=quota,
                    used=used,
                )
            now = self.realm.clock.seconds()
            upload_id = _new_id()
            up = self._upload(
                {
                    "upload_id": upload_id,
                    "user": user,
                    "to": to_addr,
                    "name": name,
                    "size": size,
                    "media_type": media_type,
                    "sha256": sha256,
                    "created": now,
                }
            )
            up.touched = now
            yield self.realm.store.put_upload(up.record())
            self.uploads[upload_id] = up
            self.log.info(
                "upload {id} of {size} bytes from {user} to {to}",
                id=upload_id,
                size=size,
                user=user,
                to=to_addr,
            )
            return up

        d = recipient if isinstance(recipient, Deferred) else succeed(recipient)
        return d.addCallback(lambda addr: self._offer_lock.run(check, addr))

    def _upload(self, rec: dict[str, Any]) -> Upload:
        writer = SerialWriter(self.store.run, self.store.part_path(rec["upload_id"]))
        return Upload(
            upload_id=rec["upload_id"],
            user=rec["user"],
            to=rec["to"],
            name=rec["name"],
            size=rec["size"],
            media_type=rec["media_type"],
            sha256=rec["sha256"],
            created=rec["created"],
            writer=writer,
        )

    def _check_offer(
        self, name: Any, size: Any, sha256: Any, media_type: Any
    ) -> tuple[str, str, str]:
        if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME:
            raise ChatError("bad_request", f"a file name must be 1-{MAX_NAME} characters")
        if any(c in name for c in "/\\"):
            raise ChatError("bad_request", "a file name has no '/' or '\\'")
        check_label(name, "a file name")
        if name in (".", ".."):
            raise ChatError("bad_request", "a file name cannot be '.' or '..'")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ChatError("bad_request", "size must be an integer >= 0")
        limit = self.config.max_file_size
        if size > limit:
            raise ChatError(
                "too_large", f"the file is {size} bytes; the limit is {limit}", limit=limit
            )
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256.lower()):
            raise ChatError("bad_request", "sha256 must be 64 hexadecimal digits")
        if media_type is None:
            media_type = DEFAULT_MEDIA_TYPE
        if not isinstance(media_type, str) or not _MEDIA_TYPE.fullmatch(media_type):
            raise ChatError("bad_request", "media_type must look like type/subtype")
        return name, sha256.lower(), media_type.lower()

    def _recipient(self, user: str, to: Any) -> str | Deferred[str]:
        """The canonical address ``user`` may send a file to (a user, or a group
        ``user`` is a member of, here or -- federation -- on another realm)."""
        if not isinstance(to, str):
            raise ChatError("bad_request", "field 'to' must be a string")
        realm = self.realm
        if to.startswith("#"):
            addr = realm.group_handler.address(to, True, user)
            realm.group_handler.item_realms(user, addr)  # not_member
            return addr
        # A user on another realm (federation): that realm fetches the bytes from here.
        resolved = realm.messages.resolve_user(to, True, user)
        if isinstance(resolved, Deferred):
            return resolved.addCallback(str)
        return str(resolved)

    def _own(self, user: str, upload_id: Any) -> Upload:
        up = self.uploads.get(upload_id) if isinstance(upload_id, str) else None
        if up is None or up.user != user:
            raise ChatError("no_such_upload", f"no unfinished upload {str(upload_id)[:64]!r}")
        return up

    def status(self, user: str, upload_id: str) -> Deferred[Upload]:
        """The upload, once every accepted byte is on disk: its ``offset`` is where the
        uploader continues (after a dropped connection, say).  ``no_such_upload``."""
        try:
            up = self._own(user, upload_id)
        except ChatError as e:
            return fail(e)

        def settled(_: object) -> Upload:
            up.accepted = up.writer.offset  # bytes whose write failed must come again
            up.writer.failed = None
            return up

        return up.writer.drained().addCallback(settled)

    def write(self, user: str, upload_id: str, offset: int, data: bytes) -> Deferred[int]:
        """Append ``data`` at ``offset``, which must be the upload's current end
        (``bad_offset`` with the expected ``offset`` otherwise; ``too_large`` past the
        announced size).  Fires with the bytes on disk once ``data`` is written.
        Writes are accepted at once and queued, so a caller may pipeline them; it
        should stop reading its source while many bytes are pending (flow control)."""
        try:
            up = self._own(user, upload_id)
            if up.finishing:
                raise ChatError("bad_request", "the upload is being finished")
            if offset != up.accepted:
                raise ChatError(
                    "bad_offset",
                    f"upload {upload_id} continues at offset {up.accepted}",
                    offset=up.accepted,
                    upload=upload_id,
                )
            if up.accepted + len(data) > up.size:
                raise ChatError(
                    "too_large",
                    f"upload {upload_id} was announced with {up.size} bytes",
                    limit=up.size,
                    upload=upload_id,
                )
        except ChatError as e:
            return fail(e)
        up.accepted += len(data)
        self.realm.stats.file_bytes_in += len(data)
        up.touched = self.realm.clock.seconds()
        d = up.writer.write(data)
        d.addErrback(self._write_failed, up)
        return d

    def _write_failed(self, f: Any, up: Upload) -> Any:
        self.log.failure("writing upload {id} failed", f, id=up.upload_id)
        up.accepted = up.writer.offset
        raise ChatError("internal_error", "the realm could not store the bytes; resume")

    def pending(self, user: str, upload_id: str) -> int:
        """Bytes accepted for the upload and not yet on disk (for flow control)."""
        up = self.uploads.get(upload_id)
        return up.writer.pending if up is not None and up.user == user else 0

    def finish(self, user: str, upload_id: str) -> Deferred[Any]:
        """Verify and store the upload, then post its ``file`` message.

        Fires with ``(FileInfo, Envelope)`` once the file and its message are committed
        (the message is delivered like any other; recipients download later).  Fails
        with ``incomplete`` (with ``offset``) if bytes are missing, or
        ``checksum_mismatch``: the bytes do not match the announced sha256, so the
        upload is discarded and nothing is stored.  The recipient is checked again
        (``not_member`` if the sender left the group meanwhile).

        An upload is posted at most once: asked again (the answer was lost with a
        connection), a finish still running gives its outcome when it ends, and a
        finished upload (see :meth:`posted`) its ``(FileInfo, Envelope)`` at once.
        """
        done = self.posted(user, upload_id)
        if done is not None:
            return succeed(done)
        try:
            up = self._own(user, upload_id)
        except ChatError as e:
            return fail(e)
        waiting = self._finishing.get(upload_id)
        if waiting is not None:
            d: Deferred[Any] = Deferred()
            waiting.append(d)
            return d
        waiters = self._finishing[upload_id] = []

        def settle(result: Any) -> Any:
            del self._finishing[upload_id]
            if not isinstance(result, Failure):
                self.finished[upload_id] = (user, self.realm.clock.seconds(), *result)
                while len(self.finished) > FINISHED_REMEMBERED:
                    self.finished.popitem(last=False)
            for w in waiters:
                w.errback(result) if isinstance(result, Failure) else w.callback(result)
            return result

        return self._finish(user, up).addBoth(settle)

    def posted(self, user: str, upload_id: Any) -> tuple[FileInfo, Envelope] | None:
        """``(FileInfo, Envelope)`` of ``user``'s upload ``upload_id`` if it was
        finished (posted) lately, else None: ``file_resume`` of a finished upload
        answers with it (see PROTOCOL.md), so nothing is sent or posted again."""
        known = self.finished.get(upload_id) if isinstance(upload_id, str) else None
        if known is None or known[0] != user:
            return None
        return known[2], known[3]

    @inlineCallbacks
    def _finish(self, user: str, up: Upload) -> Any:
        upload_id = up.upload_id
        up.finishing = True
        try:
            yield up.writer.drained()
            if up.offset != up.size:
                raise ChatError(
                    "incomplete",
                    f"the realm has {up.offset} of {up.size} bytes",
                    offset=up.offset,
                    upload=upload_id,
                )
            digest = yield up.writer.digest()
            if digest != up.sha256:
                yield self._drop(up)
                self.log.info("upload {id}: sha256 mismatch, discarded", id=upload_id)
                raise ChatError(
                    "checksum_mismatch",
                    f"the bytes have sha256 {digest}, not {up.sha256}; upload discarded",
                )
            to = self._recipient(user, up.to)
            if isinstance(to, Deferred):
                to = yield to
            yield self._blob_lock.acquire()
            try:
                created = yield self.store.commit(upload_id, up.sha256)
                meta = {
                    "file_id": _new_id(),
                    "sha256": up.sha256,
                    "size": up.size,
                    "name": up.name,
                    "media_type": up.media_type,
                }
                env = self.realm.messages.new_envelope(user, to, "file", up.name, meta)
                try:
                    env = yield self.realm.commit_item(env)
                except BaseException:
                    referenced = yield self.realm.store.blob_referenced(up.sha256)
                    if created and not referenced:
                        yield self.store.remove_blobs([up.sha256])
                    raise
            finally:
                self._blob_lock.release()
        finally:
            up.finishing = False
        self.uploads.pop(upload_id, None)
        yield self.realm.store.delete_upload(upload_id)
        info = _info(env)
        self.log.info(
            "file {file} ({size} bytes) from {user} to {to} at {pos}",
            file=info.file_id,
            size=info.size,
            user=user,
            to=to,
            pos=env.pos,
        )
        return info, env

    def cancel(self, user: str, upload_id: str) -> Deferred[None]:
        """Discard an unfinished upload and its bytes (``no_such_upload``)."""
        try:
            up = self._own(user, upload_id)
            if up.finishing:
                raise ChatError("bad_request", "the upload is being finished")
        except ChatError as e:
            return fail(e)
        self.log.info("upload {id} cancelled by {user}", id=upload_id, user=user)
        return self._drop(up)

    @inlineCallbacks
    def forget_user(self, user: str) -> Any:
        """Discard the unfinished uploads of ``user``, whose account was deleted (the
        store deleted their records with it)."""
        for up in [u for u in self.uploads.values() if u.user == user]:
            self.log.info(
                "upload {id} discarded: account {user} deleted", id=up.upload_id, user=user
            )
            yield self._drop(up)

    @inlineCallbacks
    def _drop(self, up: Upload) -> Any:
        self.uploads.pop(up.upload_id, None)
        yield up.writer.drained()
        yield self.store.discard(up.upload_id)
        yield self.realm.store.delete_upload(up.upload_id)

    # downloads ----------------------------------------------------------------------

    @inlineCallbacks
    def info(self, user: str, file_id: str) -> Any:
        """The :class:`FileInfo` of a file ``user`` may download: they sent it or it
        was sent to them, or to a group they are a member of and whose history they
        can read at the file's position.  Otherwise ``no_such_file``: the same answer
        as for a file that does not exist or has expired, so that a file id tells no
        one outside its conversation that the file exists, or in which group."""
        if not isinstance(file_id, str) or not _ID.fullmatch(file_id):
            raise ChatError("no_such_file", "no such file")
        rec = yield self.realm.store.file_info(file_id)
        if rec is None:
            raise ChatError("no_such_file", f"no file {file_id} (or it expired)")
        info = FileInfo(**rec)
        if info.recipient.startswith("#"):
            try:
                floor = self.realm.groups.readable_from(info.recipient, user)
            except ChatError:  # not a member (or no such group any more)
                raise ChatError("no_such_file", f"no file {file_id}") from None
            if info.pos <= floor:
                raise ChatError("no_such_file", f"no file {file_id} in your history")
        elif user not in (info.sender, info.recipient):
            raise ChatError("no_such_file", f"no file {file_id}")
        elif info.pos <= ((yield self.realm.account_floor(user)) or 0):
            # sent to or by a deleted account of the same name, not to this one
            raise ChatError("no_such_file", f"no file {file_id}")
        return info

    def open_download(
        self, user: str, file_id: str, offset: int = 0, length: int | None = None
    ) -> Deferred[Download]:
        """A :class:`Download` of ``length`` bytes (default: to the end) from
        ``offset`` of a file ``user`` may read (see :meth:`info`); a range outside the
        file is ``bad_request``.  Nothing is read until ``Download.start(consumer)``."""
        return self._open(file_id, self._check_download, user, file_id, offset, length)

    @inlineCallbacks
    def _check_download(self, user: str, file_id: str, offset: Any, length: Any) -> Any:
        info = yield self.info(user, file_id)
        if not isinstance(offset, int) or not 0 <= offset <= info.size:
            raise ChatError("bad_request", f"offset must be between 0 and {info.size}")
        if length is None:
            length = info.size - offset
        if not isinstance(length, int) or length < 0 or offset + length > info.size:
            raise ChatError("bad_request", f"the range ends past the file's {info.size} bytes")
        if not (yield self.store.has_blob(info.sha256)):
            self.log.error("file {file}: blob {sha} is missing", file=file_id, sha=info.sha256)
            raise ChatError("no_such_file", f"the bytes of {file_id} are gone")
        return info, offset, length

    @inlineCallbacks
    def _open(self, file_id: Any, check: Callable[..., Deferred[Any]], *args: Any) -> Any:
        """The :class:`Download` of what ``check(*args)`` fires with, ``(info, offset,
        length)``, once it has read the file's record and checked the request.  A
        :meth:`withdraw` of ``file_id`` meanwhile (its delete committed after the
        record was read) makes it ``no_such_file``, as if the delete came first.

        The blob is opened here, before the Download is handed out (and its request
        answered): the clean-up may remove it at any time after ``check`` found it (a
        blob whose file another worker deleted), and it is then ``no_such_file`` now
        rather than a failure on the missing file once the answer is out.  Opened, its
        bytes stay readable to the end (a withdraw still stops the download)."""
        opening = _Opening()
        key = file_id if isinstance(file_id, str) else ""
        self._opening.setdefault(key, set()).add(opening)
        fd: int | None = None
        try:
            info, offset, length = yield check(*args)
            try:
                fd = yield self.store.open_blob(info.sha256)
            except FileNotFoundError:
                raise ChatError("no_such_file", f"the bytes of {file_id} are gone") from None
        finally:
            held = self._opening[key]
            held.discard(opening)
            if not held:
                del self._opening[key]
        if opening.withdrawn or info.ts < self._expired_before:
            if fd is not None:
                os.close(fd)
            raise ChatError("no_such_file", f"file {file_id} was deleted")
        return self._download(info, offset, length, fd)

    def _download(
        self, info: FileInfo, offset: int, length: int, fd: int | None = None
    ) -> Download:
        """A :class:`Download`, counted among ``info``'s downloads in progress until
        it ends."""
        file_id = info.file_id
        in_progress = self.downloads.setdefault(file_id, set())

        def ended() -> None:
            held = self.downloads.get(file_id)
            if held is not None:
                held.discard(dl)
                if not held:
                    del self.downloads[file_id]

        dl = Download(self.store, info, offset, length, self.realm.stats, ended, fd)
        in_progress.add(dl)
        return dl

    def withdraw(self, file_id: str) -> None:
        """The file ``file_id`` is deleted (its record is gone: the delete is
        committed, or retention expired it): its downloads in progress stop, to
        clients and to peer realms alike, and those opened and not started yet never
        start (see :class:`Download`): a deleted file's bytes are not sent any more,
        even to a download begun before."""
        for opening in self._opening.get(file_id, ()):
            opening.withdrawn = True
        for dl in list(self.downloads.pop(file_id, ())):
            dl.withdraw()

    @inlineCallbacks
    def recheck(self) -> Any:
        """Another process serving the realm (a worker of a cluster) committed a
        delete: :meth:`withdraw` the files with downloads in progress, or being
        opened, here whose record is gone.  Fires once done."""
        for file_id in sorted(set(self.downloads) | set(self._opening)):
            if _ID.fullmatch(file_id) and (yield self.realm.store.file_info(file_id)) is None:
                self.withdraw(file_id)

    def _withdraw_where(self, gone: Callable[[FileInfo], bool]) -> None:
        """:meth:`withdraw` every file with downloads in progress for which ``gone``
        holds."""
        for file_id, held in list(self.downloads.items()):
            if any(gone(dl.info) for dl in held):
                self.withdraw(file_id)

    # federation ---------------------------------------------------------------------

    def serve_remote(self, realm: str, file_id: Any) -> Deferred[Download]:
        """A :class:`Download` of a whole file for peer ``realm``, which is storing a
        ``file`` item this realm sent it and fetches the item's bytes.

        A peer reads only what was sent to it: the file's item must be queued for
        ``realm`` in the outbox (sent, not yet acknowledged -- the peer acknowledges
        only after it has the bytes).  The item was queued by the realm's rules: a
        file to a user of ``realm``; to a group of this realm that has members on
        ``realm`` (whoever sent it: this realm may have fetched it from a member's
        realm); to a group whose home is ``realm``, from a user of this realm.  Any
        other file, or one whose item was acknowledged, is ``no_such_file``."""
        return self._open(file_id, self._check_remote, realm, file_id)

    @inlineCallbacks
    def _check_remote(self, realm: str, file_id: Any) -> Any:
        if not isinstance(file_id, str) or not _ID.fullmatch(file_id):
            raise ChatError("no_such_file", "no such file")
        rec = yield self.realm.store.file_info(file_id)
        if rec is None:
            raise ChatError("no_such_file", f"no file {file_id} (or it expired)")
        info = FileInfo(**rec)
        if not (yield self.realm.store.outbox_holds(realm, info.pos)):
            raise ChatError("no_such_file", f"no file {file_id} for {realm}")
        if not (yield self.store.has_blob(info.sha256)):
            raise ChatError("no_such_file", f"the bytes of {file_id} are gone")
        return info, 0, info.size

    def receive_blob(self, sha256: str, size: int) -> RemoteBlob:
        """Somewhere to write the bytes of a file another realm sends (federation);
        ``too_large`` past this realm's ``max_file_size``."""
        if size > self.config.max_file_size:
            raise ChatError(
                "too_large",
                f"{size} bytes; this realm takes files up to {self.config.max_file_size}",
            )
        return RemoteBlob(self, sha256, size)

    # clean-up -----------------------------------------------------------------------

    @inlineCallbacks
    def drop_blob(self, sha256: str) -> Any:
        """Remove the bytes with this digest if no recorded file refers to them any
        more (a deleted file item's: its record is gone).  Fires with whether they
        were removed.  Under the lock uploads take to reuse a blob, so an upload of
        the same bytes finishing meanwhile keeps them."""
        yield self._blob_lock.acquire()
        try:
            if (yield self.realm.store.blob_referenced(sha256)):
                return False
            return bool((yield self.store.remove_blobs([sha256])))
        finally:
            self._blob_lock.release()

    @inlineCallbacks
    def cleanup(self) -> Any:
        """Discard uploads idle for ``upload_expiry`` seconds, forget files older than
        ``retention_days`` (their downloads in progress stop, see :meth:`withdraw`)
        and delete blobs no file refers to any more (including blobs orphaned by a
        crash between storing the bytes and the message).
        Fires with counts: ``{"uploads", "blobs"}``."""
        now = self.realm.clock.seconds()
        while self.finished:  # oldest first: forget what finished an expiry ago
            _user, when, _info, _env = next(iter(self.finished.values()))
            if now - when < self.config.upload_expiry:
                break
            self.finished.popitem(last=False)
        idle = [
            up
            for up in list(self.uploads.values())
            if not up.finishing and now - up.touched >= self.config.upload_expiry
        ]
        for up in idle:
            self.log.info("upload {id} expired", id=up.upload_id)
            yield self._drop(up)
        yield self._blob_lock.acquire()
        try:
            before = now - self.config.retention_days * 86400.0
            digests = yield self.realm.store.expire_files(before)
            self._expired_before = max(self._expired_before, before)
            # Expired files are deleted: their downloads in progress stop now.
            self._withdraw_where(lambda info: info.ts < before)
            orphans = []
            for sha in (yield self.store.list_blobs()):
                if sha not in digests and not (yield self.realm.store.blob_referenced(sha)):
                    orphans.append(sha)
            going = set(digests) | set(orphans)
            # (bytes no record refers to: a file deleted by another process of the realm)
            self._withdraw_where(lambda info: info.sha256 in going)
            removed = yield self.store.remove_blobs(sorted(going))
        finally:
            self._blob_lock.release()
        if idle or removed:
            self.log.info(
                "file clean-up: {uploads} uploads, {blobs} blobs removed",
                uploads=len(idle),
                blobs=removed,
            )
        return {"uploads": len(idle), "blobs": removed}


class RemoteBlob:
    """The bytes of a file fetched from another realm: written to a partial file,
    then verified and stored as a blob like an upload's (:meth:`finish`).

    :meth:`finish` leaves the blob lock held, so that the clean-up cannot remove the
    new blob before its message is committed: call :meth:`release` after that.
    """

    def __init__(self, files: FileService, sha256: str, size: int) -> None:
        self.files = files
        self.sha256 = sha256
        self.size = size
        self.upload_id = "fed-" + _new_id()
        self.writer = SerialWriter(files.store.run, files.store.part_path(self.upload_id))
        self.received = 0
        self._locked = False

    def write(self, data: bytes) -> Deferred[int]:
        self.received += len(data)
        if self.received > self.size:
            raise ChatError("too_large", f"more than the announced {self.size} bytes")
        self.files.realm.stats.file_bytes_in += len(data)
        return self.writer.write(data)

    @inlineCallbacks
    def finish(self) -> Any:
        """Verify (``incomplete``, ``checksum_mismatch``) and store the bytes."""
        try:
            yield self.writer.drained()
            if self.writer.failed is not None:
                raise ChatError("internal_error", "the bytes could not be written")
            if self.writer.offset != self.size:
                raise ChatError(
                    "incomplete", f"{self.writer.offset} of {self.size} bytes", offset=0
                )
            digest = yield self.writer.digest()
            if digest != self.sha256:
                raise ChatError("checksum_mismatch", f"the bytes have sha256 {digest}")
        except BaseException:
            yield self.abort()
            raise
        yield self.files._blob_lock.acquire()
        self._locked = True
        yield self.files.store.commit(self.upload_id, self.sha256)

    def abort(self) -> Deferred[None]:
        d = self.writer.drained()
        d.addCallback(lambda _: self.files.store.discard(self.upload_id))
        return d

    def release(self) -> None:
        if self._locked:
            self._locked = False
            self.files._blob_lock.release()


def announced_limits(config: FilesConfig) -> dict[str, int]:
    """The file limits a realm with this ``[files]`` configuration announces in hello."""
    return {
        "max_file_size": config.max_file_size,
        "file_quota": config.quota_per_user,
        "file_chunk": config.chunk_size,
    }


def finish_result(info: FileInfo, env: Envelope) -> dict[str, Any]:
    """The result of ``file_finish`` (and of ``file_resume`` of a finished upload)."""
    return {"file": info.file_id, "pos": env.pos, "msg_id": env.id, "ts": env.ts}


def _info(env: Envelope) -> FileInfo:
    m = env.meta or {}
    return FileInfo(
        file_id=m["file_id"],
        sha256=m["sha256"],
        size=m["size"],
        name=m["name"],
        media_type=m["media_type"],
        sender=env.sender,
        recipient=env.recipient,
        ts=env.ts,
        pos=env.pos,
    )
