"""The PostgreSQL store's append path: one group commit as one transaction.

Part of :mod:`chatproto.store.postgresql` (a mixin of its
:class:`chatproto.store.postgresql.db.PostgresDB`): positions drawn in one query,
items written with one ``COPY``, the outbox rows (numbered by the positions), acks and
read markers of the batch with them; a batch that fails is redone alone under a
savepoint.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import psycopg
from psycopg import sql

from chatproto.envelope import Envelope, alternate_id
from chatproto.relations import DELETED_META, TARGET_KINDS
from chatproto.store import (
    MAX_DEVICES,
    stored_meta,
)
from chatproto.store.acks import KnownAcks
from chatproto.store.groupcommit import (
    CommitResult,
    delete_accounts,
    outbox_rows,
    plan_inserts,
    skip_missing_accounts,
    without_users,
)
from chatproto.store.grouprealms import GroupFanout, GroupRealms, group_notes
from chatproto.store.postgresql.rows import (
    INDEXED_KINDS,
    ITEM_COLS,
    escape_text,
    item_of_row,
    row_of_item,
    unescape_text,
)
from chatproto.store.postgresql.writers import WriterPositions, group_lock_key, outbox_seqs
from chatproto.store.reading import REF_KINDS_SQL
from chatproto.store.userconvs import UserConvs

__all__ = ["CommitSQL"]


class CommitSQL(WriterPositions):
    """Group commits over ``conn``.  Hooks the class using it provides:
    :meth:`user_floor`, :meth:`_delete_account`, :meth:`_set_reads`."""

    user_floor: Callable[[str], int | None]
    _delete_account: Callable[[str, str], None]
    _set_reads: Callable[[dict[tuple[str, str], int]], None]
    _key: bytes | None
    #: The user_convs rows this connection knows are committed.
    _user_convs: UserConvs
    #: The acks rows this connection knows are committed.
    _known_acks: KnownAcks
    #: ``@`` and the realm's name: the acks and read markers of addresses ending so
    #: are written only while their account exists (:meth:`_of_accounts`); None: not
    #: checked (a store not told its realm).
    local_suffix: str | None = None
    #: Seconds the last group commit's COMMIT took (for the metrics).
    sync_seconds: float
    #: Whether the last :meth:`commit_batch` got as far as sending COMMIT.
    commit_sent: bool

    #: A commit's acks, one statement: the users of the rows it inserted (``xmax =
    #: 0``: not an update of a row there already -- which may be one another writer
    #: forgot) come back.
    _UPSERT_ACKS = (
        "WITH up AS (INSERT INTO acks SELECT * FROM unnest(%s::text[], %s::text[], "
        "%s::bigint[]) ON CONFLICT (addr, device) DO UPDATE "
        "SET pos = greatest(acks.pos, excluded.pos) RETURNING addr, xmax = 0 AS new) "
        "SELECT DISTINCT addr FROM up WHERE new"
    )

    #: After the acks' upsert: the acks of the users ``%s`` past the ``%s`` highest of
    #: each user (the first device names among equal acks: the columns are COLLATE
    #: "C", code point order) go (see IStore.set_ack, chatproto/store/acks.py); the
    #: rows forgotten come back.  A row another writer's transaction holds is left
    #: (SKIP LOCKED: the trim never waits, so it never deadlocks with that
    #: transaction); the user's next new device trims it.
    _TRIM_ACKS = (
        "DELETE FROM acks WHERE (addr, device) IN (SELECT addr, device FROM acks "
        "WHERE (addr, device) IN (SELECT addr, device FROM (SELECT addr, device, "
        "row_number() OVER (PARTITION BY addr ORDER BY pos DESC, device) AS n "
        "FROM acks WHERE addr = ANY(%s)) r WHERE n > %s) FOR UPDATE SKIP LOCKED) "
        "RETURNING addr, device"
    )

    #: The accounts of a commit's acks and read markers that exist, their rows locked
    #: (FOR KEY SHARE) in name order until the commit ends: see :meth:`_of_accounts`.
    _LOCK_ACCOUNTS = "SELECT name FROM users WHERE name = ANY(%s) ORDER BY name FOR KEY SHARE"

    #: The accounts a commit deletes, their rows locked in name order before the first
    #: is deleted (with two or more: see :meth:`_of_accounts`).
    _LOCK_DELETIONS = "SELECT name FROM users WHERE name = ANY(%s) ORDER BY name FOR UPDATE"

    _COPY_ITEMS = (
        "COPY items (pos, id, kind, sender, recipient, conv, ts, body, meta, sig) FROM STDIN"
    )

    def _next(self, seq: str, n: int) -> list[int]:
        """``n`` new values of sequence ``seq``, increasing."""
        if n <= 0:
            return []
        rows = self.conn.execute(
            sql.SQL("SELECT nextval({}) AS v FROM generate_series(1, %s) ORDER BY v").format(
                sql.Literal(seq)
            ),
            (n,),
        ).fetchall()
        return [int(r[0]) for r in rows]

    def _copy(self, statement: str, rows: Iterable[Sequence[Any]]) -> None:
        with self.conn.cursor() as cur, cur.copy(statement) as copy:
            for row in rows:
                copy.write_row(row)

    def append_batch(
        self,
        batches: Sequence[Sequence[Envelope]],
        acks: dict[tuple[str, str], int],
        outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None = None,
        remote: Sequence[bool] | None = None,
        outbox_acks: dict[str, int] | None = None,
    ) -> list[list[int | None] | Exception]:
        """Commit every batch in one transaction; return positions per batch."""
        return self.commit_batch(batches, acks, outbox, remote, outbox_acks)[0]

    def commit_batch(
        self,
        batches: Sequence[Sequence[Envelope]],
        acks: dict[tuple[str, str], int],
        outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None = None,
        remote: Sequence[bool] | None = None,
        outbox_acks: dict[str, int] | None = None,
        deletions: Sequence[tuple[str, str] | None] | None = None,
        reads: dict[tuple[str, str], int] | None = None,
        devices: int = MAX_DEVICES,
    ) -> CommitResult:
        """Commit every batch in one transaction: positions per batch, and the outbox
        rows queued as ``(realm, seq, envelope or request)`` in sequence order (the
        seqs follow the positions: see
        :func:`chatproto.store.postgresql.writers.outbox_seqs`).

        Fast path: the positions of every item in one ``nextval`` query, the items in
        one ``COPY``.  If that fails (an id taken, a value out of range), the
        transaction is redone batch by batch under savepoints, so one bad batch fails
        alone and never takes the others with it.  The rest is as for SQLite (see
        :meth:`chatproto.store.sqlite.SQLiteDB.commit_batch`).
        """
        flags = list(remote) if remote is not None else [False] * len(batches)
        args = (batches, flags, acks, outbox, outbox_acks, deletions, reads, devices)
        try:
            return self._commit(*args, each=False)
        except psycopg.OperationalError:
            raise  # the connection, not the data: the caller sees it
        except Exception:
            return self._commit(*args, each=True)

    def _commit(
        self,
        batches: Sequence[Sequence[Envelope]],
        flags: list[bool],
        acks: dict[tuple[str, str], int],
        outbox: Sequence[Sequence[tuple[str, Envelope | dict[str, Any]]]] | None,
        outbox_acks: dict[str, int] | None,
        deletions: Sequence[tuple[str, str] | None] | None,
        reads: dict[tuple[str, str], int] | None,
        devices: int,
        each: bool,
    ) -> CommitResult:
        c = self.conn
        queued_rows: list[tuple[str, int, Any]] = []
        self.commit_sent = False
        self._register_writer()
        with c.transaction():
            self._begin_commit()
            batches, outbox, missing = skip_missing_accounts(
                batches, outbox, deletions, self.user_floor
            )
            notes = group_notes(outbox)
            if notes:  # before any position is drawn
                self._lock_groups(notes)
            if each:
                out = self._append_each(batches, flags)
            else:
                out = self._append_all(batches, flags)
            names = sorted({d[0] for d in deletions or () if d is not None})
            if len(names) > 1:
                c.execute(self._LOCK_DELETIONS, (names,))
            gone = delete_accounts(out, missing, deletions, self._delete_account)
            if gone:
                acks = without_users(acks, gone)
                reads = without_users(reads, gone) if reads else reads
            if (acks or reads) and self.local_suffix is not None:
                acks, reads = self._of_accounts(acks, reads, self.local_suffix)
            convs = self._user_convs.new_rows(batches, out)
            if convs:
                with c.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO user_convs VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                        convs,
                    )
            if notes:
                assert outbox is not None
                outbox = self.fan_out(outbox, notes, out)
            if outbox:
                rows, queued_rows, requests = outbox_rows(batches, outbox, out, escape_text)
                if rows:
                    seqs = outbox_seqs([r[1] for r in rows], lambda: self._next("items_pos", 1)[0])
                    self._copy(
                        "COPY outbox (seq, realm, pos, payload) FROM STDIN",
                        ((s, *r) for s, r in zip(seqs, rows, strict=True)),
                    )
                    for k, (realm, _, env) in enumerate(queued_rows):
                        queued_rows[k] = (realm, seqs[k], env)
                    queued_rows.sort(key=lambda r: r[1])
                if requests:
                    with c.cursor() as cur:
                        cur.executemany(
                            "INSERT INTO requests VALUES (%s, %s, %s, %s, %s) "
                            "ON CONFLICT (id) DO NOTHING",
                            requests,
                        )
            if outbox_acks:
                with c.cursor() as cur:
                    cur.executemany(
                        "DELETE FROM outbox WHERE realm = %s AND seq <= %s",
                        list(outbox_acks.items()),
                    )
            forgotten: list[tuple[str, str]] = []
            if acks:
                keys = sorted(acks)  # (row locks taken in one order by every writer)
                inserted = c.execute(
                    self._UPSERT_ACKS,
                    (
                        [u for u, _ in keys],
                        [escape_text(d) for _, d in keys],
                        [acks[k] for k in keys],
                    ),
                ).fetchall()
                users = sorted({r[0] for r in inserted}.union(self._known_acks.new_users(keys)))
                if users:  # (the bound: only users who may have a new row)
                    trimmed = c.execute(self._TRIM_ACKS, (users, max(1, devices))).fetchall()
                    forgotten = [(u, unescape_text(d)) for u, d in trimmed]
            if reads:
                self._set_reads(reads)
            self._end_commit()
            self.commit_sent = True  # past here a lost connection leaves it unknown
            synced = time.perf_counter()
        self.sync_seconds = time.perf_counter() - synced
        self._user_convs.committed(convs)
        if acks:
            self._known_acks.committed(acks, forgotten)
        return out, queued_rows

    def _of_accounts(
        self,
        acks: dict[tuple[str, str], int],
        reads: dict[tuple[str, str], int] | None,
        suffix: str,
    ) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int] | None]:
        """``acks`` and ``reads`` (by ``(user address, ...)``) less those of local
        users (addresses ending with ``suffix``; a read marker of another realm's user
        is kept) whose account does not exist: an ack or read marker waiting in this
        writer's group commit while another worker deletes its account must not be
        written after the deletion (a later account of the name would find it; one
        writer's own deletions are left out by ``without_users``).

        Race-free under READ COMMITTED because the accounts' ``users`` rows are locked
        FOR KEY SHARE (until this commit ends) before the upserts:

        - a deletion committed before: the row is not found, the marks are dropped;
        - a deletion that has run and not committed: the lock waits for it, then skips
          the deleted row (a plain ``EXISTS`` would still see the row in its snapshot
          and write the marks after the delete);
        - a deletion that starts after the lock: its ``DELETE FROM users`` waits for
          this commit, and its ``DELETE FROM acks`` / ``read_markers`` (later
          statements, fresh snapshots) see and delete what this commit wrote.

        KEY SHARE conflicts only with a deletion (or a change of the name), never with
        another writer's KEY SHARE or an update of other columns (password, floor).
        Deadlocks: the locks are taken in one statement in name order, and a commit
        deleting two or more accounts locks their rows in name order first
        (``_LOCK_DELETIONS``), so a deleting commit and a commit with marks never wait
        for each other's account rows in opposite orders.  Only two commits that both
        delete an account, each with marks of the other's, can still deadlock (the
        server ends one; its group commit fails, its callers get an error and may
        retry).  One more round trip per group commit that has marks."""
        users = {u for u, _ in acks}
        if reads:
            users.update(u for u, _ in reads)
        names = sorted({u[: -len(suffix)] for u in users if u.endswith(suffix)})
        if not names:
            return acks, reads
        found = {r[0] for r in self.conn.execute(self._LOCK_ACCOUNTS, (names,)).fetchall()}
        if len(found) == len(names):
            return acks, reads
        gone = {n + suffix for n in names if n not in found}
        return without_users(acks, gone), without_users(reads, gone) if reads else reads

    # the realms of groups' items (chatproto/store/grouprealms.py) ---------------------

    def _lock_groups(self, notes: Sequence[tuple[int, GroupFanout | GroupRealms]]) -> None:
        """Take the lock of each group the commit has notes of, in key order (two
        commits never wait for each other's): exclusive where it changes the group's
        realms, else shared.  Held to the end of the transaction, taken before its
        positions are drawn: so a change and an item of one group never draw their
        positions in one order and commit in the other."""
        keys: dict[int, bool] = {}
        for _, note in notes:
            key = group_lock_key(self.schema, note.group)
            keys[key] = keys.get(key, False) or isinstance(note, GroupRealms)
        for key in sorted(keys):
            if keys[key]:
                self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (key,))
            else:
                self.conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (key,))

    def fan_out(
        self,
        outbox: Sequence[Sequence[tuple[str, Any]]],
        notes: Sequence[tuple[int, GroupFanout | GroupRealms]],
        positions: Sequence[list[int | None] | Exception],
    ) -> list[Sequence[tuple[str, Any]]]:
        """Inside a commit holding its groups' locks, its items inserted
        (``positions`` per batch): the outbox with each :class:`GroupFanout` replaced
        by ``(realm, item)`` pairs -- the group's realms as recorded by the last change
        committed before the item (before it in this commit, or before the commit drew
        its positions: the lock), or the worker's if none is recorded -- and each
        :class:`GroupRealms` of a batch that did not fail recorded in ``group_realms``.
        """
        fanned = sorted({n.group for _, n in notes if isinstance(n, GroupFanout)})
        realms: dict[str, set[str]] = {}
        if fanned:
            for grp, realm in self.conn.execute(
                "SELECT grp, realm FROM group_realms WHERE grp = ANY(%s)", (fanned,)
            ).fetchall():
                known = realms.setdefault(grp, set())
                if realm:
                    known.add(realm)
        changed: dict[str, tuple[str, ...]] = {}
        out = list(outbox)
        for i in sorted({i for i, _ in notes}):
            failed = isinstance(positions[i], Exception)
            entries: list[tuple[str, Any]] = []
            for realm, obj in out[i]:
                if isinstance(obj, GroupRealms):
                    if not failed:
                        realms[obj.group] = set(obj.realms)
                        changed[obj.group] = obj.realms
                elif isinstance(obj, GroupFanout):
                    recorded = realms.get(obj.group)
                    at = set(obj.realms) if recorded is None else recorded
                    chosen = sorted(at - {obj.origin})
                    obj.queued = chosen
                    entries += [(r, obj.item) for r in chosen]
                else:
                    entries.append((realm, obj))
            out[i] = entries
        if changed:
            with self.conn.cursor() as cur:
                cur.executemany("DELETE FROM group_realms WHERE grp = %s", [(g,) for g in changed])
                cur.executemany(
                    "INSERT INTO group_realms VALUES (%s, %s)",
                    [(g, r) for g, rs in changed.items() for r in ("", *rs)],
                )
        return out

    def forget_group_realms(self) -> None:
        """Forget what workers recorded of groups' realms (a single-process realm
        opens the schema: it changes them without recording)."""
        self.conn.execute("DELETE FROM group_realms")

    def _id_key(self) -> bytes:
        if self._key is None:
            row = self.conn.execute("SELECT value FROM settings WHERE key = 'id_key'").fetchone()
            if row is None:
                raise RuntimeError(f"{self.path}: settings.id_key is missing")
            self._key = bytes.fromhex(row[0])
        return self._key

    def _stored_ids(self, ids: Sequence[str]) -> dict[str, tuple[str, str]]:
        """Which of ``ids`` are stored already, with their (sender, recipient)."""
        rows = self.conn.execute(
            "SELECT id, sender, recipient FROM items WHERE id = ANY(%s)",
            ([escape_text(i) for i in ids],),
        ).fetchall()
        return {unescape_text(r[0]): (r[1], r[2]) for r in rows}

    def _append_all(
        self, batches: Sequence[Sequence[Envelope]], remote: Sequence[bool]
    ) -> list[list[int | None] | Exception]:
        """Every item of every batch in one ``COPY``, in batch order; remote items
        de-duplicated first, as in SQLite's ``_append_all``."""
        plan, chosen, renamed = plan_inserts(batches, remote, self._stored_ids, self._id_key)
        try:
            positions = self._next("items_pos", len(chosen))
            if chosen:
                self._copy(
                    self._COPY_ITEMS,
                    (row_of_item(e, p) for e, p in zip(chosen, positions, strict=True)),
                )
            out: list[list[int | None] | Exception] = []
            files: list[tuple[Envelope, int]] = []
            it = iter(positions)
            for batch, inserted in zip(batches, plan, strict=True):
                got: list[int | None] = []
                for k, e in enumerate(batch):
                    if inserted is None or inserted[k]:
                        pos = next(it)
                        got.append(pos)
                        if e.kind in INDEXED_KINDS:
                            files.append((e, pos))
                    else:
                        got.append(None)
                out.append(got)
            if files:
                self._index_files([e for e, _ in files], [p for _, p in files])
            return out
        except Exception:
            for e, original in renamed:  # redone item by item (_append_each)
                e.id = original
            raise

    _INSERT = (
        "INSERT INTO items (pos, id, kind, sender, recipient, conv, ts, body, meta, sig) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    )
    _INSERT_REMOTE = (
        "INSERT INTO items (pos, id, kind, sender, recipient, conv, ts, body, meta, sig) "
        "VALUES (nextval('items_pos'), %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (id) DO NOTHING RETURNING pos"
    )

    def _insert_remote(self, batch: Sequence[Envelope]) -> list[int | None]:
        """Insert items from another realm one by one, skipping ids stored already
        (and moving one whose id another conversation took to its alternate id)."""
        c = self.conn
        out: list[int | None] = []
        for env in batch:
            row = c.execute(self._INSERT_REMOTE, row_of_item(env, 0)[1:]).fetchone()
            if row is None:  # stored already -- or the id is taken by another item
                had = self._stored_ids([env.id]).get(env.id)
                if had is not None and had != (env.sender, env.recipient):
                    env.id = alternate_id(env, self._id_key())
                    row = c.execute(self._INSERT_REMOTE, row_of_item(env, 0)[1:]).fetchone()
            out.append(int(row[0]) if row else None)
        files = [
            (e, pos) for e, pos in zip(batch, out, strict=True) if e.kind in INDEXED_KINDS and pos
        ]
        if files:
            self._index_files([e for e, _ in files], [pos for _, pos in files if pos])
        return out

    def _append_each(
        self, batches: Sequence[Sequence[Envelope]], remote: Sequence[bool]
    ) -> list[list[int | None] | Exception]:
        c = self.conn
        out: list[list[int | None] | Exception] = []
        for batch, is_remote in zip(batches, remote, strict=True):
            try:
                with c.transaction():  # a savepoint: one bad batch fails alone
                    positions: list[int | None]
                    if is_remote:
                        positions = self._insert_remote(batch)
                    else:
                        local = self._next("items_pos", len(batch))
                        with c.cursor() as cur:
                            cur.executemany(
                                self._INSERT,
                                [row_of_item(e, p) for e, p in zip(batch, local, strict=True)],
                            )
                        self._index_files(batch, local)
                        positions = list(local)
                out.append(positions)
            except psycopg.OperationalError:
                raise
            except Exception as err:  # one bad batch must not fail the others
                out.append(err)
        return out

    _COPY_FILES = (
        "COPY files (file_id, sha256, size, name, media_type, sender, recipient, ts, pos) "
        "FROM STDIN"
    )

    def _index_files(self, batch: Sequence[Envelope], positions: Sequence[int]) -> None:
        """Record what each item about another refers to (one statement for the
        batch), the file of each ``file`` item (with its message's position), and
        wipe the item each ``delete`` item deletes."""
        # (each ref escaped, as items.id is: the refs rows are looked up by escaped
        # ids and joined with items.id)
        refs = [
            (escape_text(ref), pos)
            for env, pos in zip(batch, positions, strict=True)
            if env.kind != "file"
            and env.meta is not None
            and isinstance(ref := env.meta.get("ref"), str)
        ]  # an edit, delete or reaction (chatproto.relations): all in one round trip
        if refs:
            with self.conn.cursor() as cur:
                cur.executemany("INSERT INTO refs VALUES (%s, %s) ON CONFLICT DO NOTHING", refs)
        rows = []
        for env, pos in zip(batch, positions, strict=True):
            if env.kind == "delete" and env.meta is not None:
                self._wipe(env)
            elif env.kind == "edit" and env.meta is not None:
                self.conn.execute(
                    "UPDATE items SET body = '' WHERE pos = %s AND EXISTS (SELECT 1 FROM items "
                    "WHERE id = %s AND meta = %s)",
                    (pos, escape_text(str(env.meta.get("ref"))), self._DELETED),
                )
            if env.kind == "file" and env.meta is not None and "file_id" in env.meta:
                m = env.meta
                rows.append(
                    (
                        escape_text(m["file_id"]),
                        m["sha256"],
                        m["size"],
                        escape_text(m["name"]),
                        escape_text(m["media_type"]),
                        env.sender,
                        env.recipient,
                        env.ts,
                        pos,
                    )
                )
        if rows:
            self._copy(self._COPY_FILES, rows)

    _DELETED = json.dumps(DELETED_META)

    def _wipe(self, env: Envelope) -> None:
        """Inside a commit: the item ``env`` (a ``delete``) deletes loses its content
        (as in :meth:`chatproto.store.sqlite.SQLiteDB._wipe`): body, meta, signature,
        the bodies of its edits, its file record and its row in the search index."""
        ref = env.meta.get("ref") if env.meta is not None else None
        if not isinstance(ref, str):
            return
        c = self.conn
        row = c.execute(
            "SELECT kind, meta FROM items WHERE id = %s AND conv = %s",
            (escape_text(ref), env.conversation),
        ).fetchone()
        if row is None or row[0] not in TARGET_KINDS:
            return
        c.execute(
            "UPDATE items SET body = '', meta = %s, sig = NULL WHERE id = %s",
            (self._DELETED, escape_text(ref)),
        )
        # its words leave the search index with it (if a step indexed it already; one
        # indexing it now is corrected by the step that reaches this delete)
        c.execute(
            "DELETE FROM search_text WHERE pos IN (SELECT pos FROM items WHERE id = %s)",
            (escape_text(ref),),
        )
        c.execute(
            "UPDATE items SET body = '' WHERE pos IN (SELECT pos FROM refs WHERE ref = %s) "
            "AND kind = 'edit'",
            (escape_text(ref),),
        )
        meta = stored_meta(row[1])
        if row[0] == "file" and meta is not None and isinstance(meta.get("file_id"), str):
            c.execute("DELETE FROM files WHERE file_id = %s", (escape_text(meta["file_id"]),))

    def _refs(self, items: Sequence[Envelope], edits_only: bool = False) -> list[Envelope]:
        """The items that refer to any of ``items`` (edits, deletes, reactions; with
        ``edits_only``, edits), oldest first."""
        # refs rows hold ids escaped, as items does (see _index_files)
        ids = [escape_text(e.id) for e in items if e.kind in TARGET_KINDS]
        if not ids:
            return []
        kinds = "kind = 'edit' AND " if edits_only else ""
        rows = self.conn.execute(
            f"SELECT {ITEM_COLS} FROM items WHERE {kinds}{REF_KINDS_SQL} "
            "AND pos IN (SELECT pos FROM refs WHERE ref = ANY(%s)) ORDER BY pos",
            (ids,),
        ).fetchall()
        return [item_of_row(r) for r in rows]
