# ruff: noqa: E501
"""Micro-benchmark of the SQLite store's commit path (no reactor, no network).

    python bench/store_micro.py [--batch 300] [--rounds 50] [--users 100] [--convs 50]
                                [--synchronous FULL] [--repeat 3]

What the writer thread pays per stored DM, with a realistic mix: ``--users`` users in
``--convs`` private conversations (each item goes to a random one of them, so every
index of ``items`` is written at many places, as on a realm with many users -- one
sender/recipient pair would keep every index's last page hot and hide their cost).

Printed, as CPU microseconds per item (``time.process_time``; the machine's load moves
them less than wall time):

- ``append_batch``: ``SQLiteDB.append_batch`` at the current schema, one single-item
  batch per send (as the realm makes them), an ack per commit: what the writer runs.
- ``search index``: ``SQLiteDB.index_search`` over the same items afterwards (the store
  does it when idle, or between commits once INDEX_FORCE items wait).
- one line per table layout: the same rows with a raw ``executemany`` (one transaction
  per batch, no savepoints), each layout in a database of its own; the layouts
  alternate round by round so they all see the same machine load.

With ``--postgresql DSN`` it runs ``PostgresDB.append_batch`` instead, in a schema of
its own (dropped after), and prints this process's CPU and the wall time per item
(the inserts' work is the server's: wall time is its measure, on a quiet machine),
then (schema 12 on) ``PostgresDB.index_search`` over the same items, as the store
does after its commits.
"""

from __future__ import annotations

import argparse
import os
import random
import sqlite3
import sys
import tempfile
import time

from chatproto.envelope import Envelope, new_message_id
from chatproto.store.sqlite import SQLiteDB

_ITEMS = """
CREATE TABLE items (
    pos INTEGER PRIMARY KEY {auto},
    id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipient TEXT NOT NULL,
    conv TEXT NOT NULL,
    ts REAL NOT NULL,
    body TEXT NOT NULL,
    meta TEXT,
    sig TEXT
);
"""

#: name -> (AUTOINCREMENT?, the indexes of items)
LAYOUTS: dict[str, tuple[bool, list[str]]] = {
    "schema 16 (sender, recipient, conv, events)": (
        True,
        [
            "CREATE INDEX items_recipient ON items (recipient, pos)",
            "CREATE INDEX items_sender ON items (sender, pos)",
            "CREATE INDEX items_conv ON items (conv, pos)",
            "CREATE INDEX items_events ON items (pos) WHERE kind = 'event'",
        ],
    ),
    "schema 17 (conv, events)": (
        True,
        [
            "CREATE INDEX items_conv ON items (conv, pos)",
            "CREATE INDEX items_events ON items (pos) WHERE kind = 'event'",
        ],
    ),
    "schema 17 without AUTOINCREMENT": (
        False,
        [
            "CREATE INDEX items_conv ON items (conv, pos)",
            "CREATE INDEX items_events ON items (pos) WHERE kind = 'event'",
        ],
    ),
    "schema 17, id not unique (no index on id)": (
        True,
        [
            "CREATE INDEX items_conv ON items (conv, pos)",
            "CREATE INDEX items_events ON items (pos) WHERE kind = 'event'",
        ],
    ),
    "no secondary index (id unique only)": (True, []),
}

#: Words of the bodies (6-20 of them: what the search index tokenizes).
WORDS = (
    "the a lunch meeting deploy release tomorrow today ok thanks please review patch "
    "build failed green red coffee team channel alice bob carol message link docs "
    "question answer maybe later now ship it merged branch main test flaky bench"
).split()


def envs(n: int, pairs: list[tuple[str, str]], rng: random.Random) -> list[Envelope]:
    out = []
    for _ in range(n):
        a, b = rng.choice(pairs)
        if rng.random() < 0.5:
            a, b = b, a
        out.append(
            Envelope(
                id=new_message_id(),
                kind="text",
                sender=a,
                recipient=b,
                ts=time.time(),
                body=" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))),
            )
        )
    return out


def conversations(users: int, convs: int, rng: random.Random) -> list[tuple[str, str]]:
    """``convs`` distinct pairs of ``users`` users; every user is in one at least when
    ``convs >= users / 2``."""
    names = [f"user{k:05d}@localhost" for k in range(users)]
    pairs: set[tuple[str, str]] = set()
    order = names[:]
    rng.shuffle(order)
    for k in range(0, len(order) - 1, 2):  # everyone first
        if len(pairs) < convs:
            pairs.add((order[k], order[k + 1]))
    while len(pairs) < convs:
        a, b = rng.sample(names, 2)
        pairs.add((min(a, b), max(a, b)))
    return sorted(pairs)


def layout_db(
    path: str, name: str, auto: bool, indexes: list[str], synchronous: str
) -> sqlite3.Connection:
    c = sqlite3.connect(path, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute(f"PRAGMA synchronous={synchronous}")
    table = _ITEMS.format(auto="AUTOINCREMENT" if auto else "")
    if "id not unique" in name:
        table = table.replace("id TEXT NOT NULL UNIQUE", "id TEXT NOT NULL")
    c.execute(table)
    for stmt in indexes:
        c.execute(stmt)
    return c


_INSERT = (
    "INSERT INTO items (id, kind, sender, recipient, conv, ts, body, meta, sig) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--users", type=int, default=100)
    ap.add_argument("--convs", type=int, default=50)
    ap.add_argument("--synchronous", default="FULL")
    ap.add_argument("--repeat", type=int, default=3, help="runs of the layouts (alternated)")
    ap.add_argument("--postgresql", metavar="DSN", help="the append path on PostgreSQL")
    a = ap.parse_args()
    rng = random.Random(1)
    pairs = conversations(a.users, a.convs, rng)
    n = a.batch * a.rounds
    print(f"{a.users} users, {len(pairs)} conversations, {a.rounds} commits of {a.batch} items")
    if a.postgresql:
        postgresql(a, pairs, rng)
        return
    with tempfile.TemporaryDirectory() as d:
        db = SQLiteDB(os.path.join(d, "s.sqlite3"), a.synchronous)
        db.migrate()
        cpu = 0.0
        for r in range(a.rounds):
            batch = [[e] for e in envs(a.batch, pairs, rng)]
            ack = {(batch[0][0].recipient, "phone"): r + 1}
            c = time.process_time()
            db.append_batch(batch, ack)
            cpu += time.process_time() - c
        print(f"append_batch (schema {db.version()}):{'':24}{1e6 * cpu / n:6.1f} us/item CPU")
        c = time.process_time()
        done = 0
        while (k := db.index_search(2000)) > 0:
            done += k
        cpu = time.process_time() - c
        print(
            f"search index (index_search, 2000 a step):{'':7}{1e6 * cpu / max(done, 1):6.1f} us/item CPU"
        )
        db.close()

        conns = {
            name: layout_db(os.path.join(d, f"l{k}.sqlite3"), name, auto, idx, a.synchronous)
            for k, (name, (auto, idx)) in enumerate(LAYOUTS.items())
        }
        cpu_of: dict[str, list[float]] = {name: [] for name in LAYOUTS}
        for _ in range(a.repeat):
            spent = dict.fromkeys(LAYOUTS, 0.0)
            for _ in range(a.rounds):
                rows = [
                    (e.id, e.kind, e.sender, e.recipient, e.conversation, e.ts, e.body, None, None)
                    for e in envs(a.batch, pairs, rng)
                ]
                for name, conn in conns.items():
                    c = time.process_time()
                    conn.execute("BEGIN IMMEDIATE")
                    conn.executemany(_INSERT, rows)
                    conn.execute("COMMIT")
                    spent[name] += time.process_time() - c
            for name in LAYOUTS:
                cpu_of[name].append(1e6 * spent[name] / n)
        for name, figures in cpu_of.items():
            shown = " / ".join(f"{f:5.1f}" for f in figures)
            print(f"executemany, {name:42} {shown} us/item CPU")
        for conn in conns.values():
            conn.close()


def backend_cpu(pid: int) -> float:
    """Seconds of CPU the server's process ``pid`` has used (0.0 where /proc cannot
    tell: the server on another machine)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgresql(a: argparse.Namespace, pairs: list[tuple[str, str]], rng: random.Random) -> None:
    import psycopg

    from chatproto.store.postgresql import SCHEMA_VERSION, PostgresDB

    schema = f"store_micro_{os.getpid()}"
    db = PostgresDB(a.postgresql, schema)
    try:
        db.migrate()
        n = a.batch * a.rounds
        server = db.conn.info.backend_pid
        for _ in range(a.repeat):
            cpu = wall = 0.0
            s0 = backend_cpu(server)
            for r in range(a.rounds):
                batch = [[e] for e in envs(a.batch, pairs, rng)]
                ack = {(batch[0][0].recipient, "phone"): r + 1}
                c, t = time.process_time(), time.perf_counter()
                db.append_batch(batch, ack)
                cpu += time.process_time() - c
                wall += time.perf_counter() - t
            busy = backend_cpu(server) - s0
            print(
                f"PostgresDB.append_batch (schema {SCHEMA_VERSION}): {1e6 * wall / n:6.1f} us/item "
                f"wall, {1e6 * busy / n:6.1f} us/item CPU of the server's backend, "
                f"{1e6 * cpu / n:6.1f} of this process"
            )
        if hasattr(db, "search_upto"):  # schema 12: indexed for search after the commits
            done, t, s0 = 0, time.perf_counter(), backend_cpu(server)
            while (k := db.index_search(2000)) > 0:
                done += k
            wall, busy = time.perf_counter() - t, backend_cpu(server) - s0
            print(
                f"search index (index_search, 2000 a step): {1e6 * wall / max(done, 1):6.1f} "
                f"us/item wall, {1e6 * busy / max(done, 1):6.1f} us/item CPU of the server's backend"
            )
    finally:
        db.close()
        with psycopg.connect(a.postgresql, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


if __name__ == "__main__":
    sys.exit(main())
