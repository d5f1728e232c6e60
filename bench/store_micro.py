# ruff: noqa: E501
"""Micro-benchmark of the SQLite store's commit path (no reactor, no network).

    python bench/store_micro.py [--batch 300] [--rounds 50] [--synchronous FULL]

Times ``SQLiteDB.append_batch`` (what the writer thread runs per group commit, with one
batch of one envelope per ``send``, as the realm produces) against an ``executemany``
variant of the same inserts, to show how much writer-thread (GIL-holding) time each
message costs.  Informational; run.py does not call it.
"""

import argparse
import os
import sys
import tempfile
import time

from chatproto.envelope import Envelope, new_message_id
from chatproto.store.sqlite import SQLiteDB


def envs(n: int) -> list[Envelope]:
    return [
        Envelope(
            id=new_message_id(),
            kind="text",
            sender="a@localhost",
            recipient="b@localhost",
            ts=time.time(),
            body="x" * 100,
        )
        for _ in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=50)
    ap.add_argument("--synchronous", default="FULL")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        db = SQLiteDB(os.path.join(d, "s.sqlite3"), a.synchronous)
        db.migrate()
        # as the realm does it: one single-item batch per send, each with a savepoint
        t = time.perf_counter()
        c = time.process_time()
        for _ in range(a.rounds):
            db.append_batch([[e] for e in envs(a.batch)], {("b@localhost", "x"): 1})
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        n = a.batch * a.rounds
        print(
            f"append_batch ({a.batch} one-item batches/commit): {1e6 * wall / n:6.1f} us/item wall, "
            f"{1e6 * cpu / n:6.1f} us/item CPU, {a.rounds / wall:6.1f} commits/s"
        )
        # the same rows with executemany, one transaction, no savepoints, no RETURNING
        sql = (
            "INSERT INTO items (id, kind, sender, recipient, conv, ts, body, meta) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
        )
        t = time.perf_counter()
        c = time.process_time()
        for _ in range(a.rounds):
            rows = [
                (e.id, e.kind, e.sender, e.recipient, e.conversation, e.ts, e.body, None)
                for e in envs(a.batch)
            ]
            db.conn.execute("BEGIN IMMEDIATE")
            db.conn.executemany(sql, rows)
            db.conn.execute("COMMIT")
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        print(
            f"executemany, no savepoints:               {1e6 * wall / n:6.1f} us/item wall, "
            f"{1e6 * cpu / n:6.1f} us/item CPU, {a.rounds / wall:6.1f} commits/s"
        )
        db.close()


if __name__ == "__main__":
    sys.exit(main())
