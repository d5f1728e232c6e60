"""The conversation list of a busy user, read from the SQL store cores.

    python bench/conversations.py [--convs 200] [--groups 50] [--rounds 20]
                                  [--noise N] [--postgresql DSN]

One realm per backend: the user ``me`` has ``--convs`` conversations, of which
``--groups`` are groups, each with 8 items (some mentioning ``me``, some deleted,
reactions) and read markers of ``me`` and of the other party on most; with
``--noise``, after N items between other users (a big ``items`` table).  Times
``conversations(...)`` (the store core's, as the reader thread runs it) ``--rounds``
times per backend and prints the least and the median ms per call, the statements it
ran (counted at the core's ``_run``) and totals of what it returned (the same on every
tree).  SQLite only without ``--postgresql`` (a DSN: the realm goes in a schema of its
own, dropped afterwards).

Run it with the interpreter of the tree to measure (the ``chatproto`` it imports is
that tree's).
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import time
from typing import Any

from chatproto.envelope import Envelope, conversation_key, new_message_id
from chatproto.store.sqlite import SQLiteDB

ME = "me@localhost"


def _env(sender: str, to: str, body: str, kind: str = "text", meta: Any = None) -> Envelope:
    return Envelope(
        id=new_message_id(),
        kind=kind,
        sender=sender,
        recipient=to,
        ts=time.time(),
        body=body,
        meta=meta,
    )


def fill(db: Any, convs: int, groups: int, noise: int = 0) -> list[tuple[str, int]]:
    """Write the realm (``noise`` items between other users first); returns the
    groups with their bound, as the realm passes them."""
    for start in range(0, noise, 5000):
        db.append_batch(
            [
                [_env(f"x{n % 500}@localhost", f"y{n % 300}@localhost", f"noise {n}")]
                for n in range(start, min(noise, start + 5000))
            ],
            {},
        )
    batches: list[list[Envelope]] = []
    marks: dict[tuple[str, str], int] = {}
    group_list = []
    targets = []
    for k in range(convs):
        if k < groups:
            to = f"#g{k}@localhost"
            group_list.append((to, 0))
            others = [f"p{k}@localhost", f"q{k}@localhost"]
        else:
            to = ME
            others = [f"p{k}@localhost"]
        for n in range(8):
            sender = others[n % len(others)] if n % 3 else ME
            recipient = to if to.startswith("#") or sender != ME else others[0]
            body = f"@me look {n}" if n in (2, 5) else f"message {n}"
            batches.append([_env(sender, recipient, body)])
        targets.append(len(batches) - 3)
    positions = [p[0] for p in db.append_batch(batches, {})]
    envs = [b[0] for b in batches]
    extra = []
    for i in targets[::3]:  # a third of the conversations: a message deleted
        t = envs[i]
        extra.append([_env(t.sender, t.recipient, "", "delete", {"ref": t.id})])
    for i in targets[1::3]:  # another third: a reaction
        t = envs[i]
        to = t.recipient if t.sender == ME or t.recipient.startswith("#") else t.sender
        extra.append([_env(ME, to, "", "reaction", {"ref": t.id, "emoji": "+1"})])
    db.append_batch(extra, {})
    for k in range(convs):
        first = positions[8 * k]
        e = envs[8 * k]
        conv = (
            e.recipient if e.recipient.startswith("#") else conversation_key(e.sender, e.recipient)
        )
        if k % 4:
            marks[(ME, conv)] = first + 3
        marks[(f"p{k}@localhost", conv)] = first + 5
    db.commit_batch([], {}, reads=marks)
    return group_list


class Counting:
    def __init__(self, db: Any) -> None:
        self.n = 0
        run = db._run

        def counted(sql: str, params: Any = ()) -> Any:
            self.n += 1
            return run(sql, params)

        db._run = counted


def measure(
    db: Any, groups: list[tuple[str, int]], rounds: int, limit: int
) -> tuple[float, int, int]:
    counter = Counting(db)
    times = []
    rows: list[Any] = []
    for _ in range(rounds):
        counter.n = 0
        t0 = time.perf_counter()
        rows = db.conversations(ME, 0, groups, "me", limit, {})
        times.append(time.perf_counter() - t0)
    unread = sum(r["unread"] for r in rows)
    mentions = sum(r["mentions"] for r in rows)
    markers = sum(len(r["markers"]) for r in rows)
    shown = f"{len(rows)} conversations ({unread} unread, {mentions} mentions, {markers} markers)"
    ms = f"{min(times) * 1000:7.2f} / {statistics.median(times) * 1000:7.2f} ms (min / median)"
    return ms, counter.n, shown


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--convs", type=int, default=200)
    ap.add_argument("--groups", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--limit", type=int, default=500)
    ap.add_argument("--noise", type=int, default=0, help="items of other users first")
    ap.add_argument("--postgresql", metavar="DSN")
    a = ap.parse_args()
    print(f"chatproto from {os.path.dirname(sys.modules['chatproto'].__file__ or '')}")
    with tempfile.TemporaryDirectory() as d:
        db = SQLiteDB(os.path.join(d, "realm.sqlite3"))
        db.migrate()
        groups = fill(db, a.convs, a.groups, a.noise)
        ms, statements, n = measure(db, groups, a.rounds, a.limit)
        print(f"sqlite      {n}: {ms} per call, {statements} statements")
        db.close()
    if a.postgresql:
        import psycopg

        from chatproto.store.postgresql import PostgresDB

        schema = f"bench_conv_{secrets.token_hex(4)}"
        try:
            pg = PostgresDB(a.postgresql, schema)
            pg.migrate()
            groups = fill(pg, a.convs, a.groups, a.noise)
            pg.conn.execute("ANALYZE")
            ms, statements, n = measure(pg, groups, a.rounds, a.limit)
            print(f"postgresql  {n}: {ms} per call, {statements} statements")
            pg.close()
        finally:
            with psycopg.connect(a.postgresql, autocommit=True) as conn:
                conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


if __name__ == "__main__":
    main()
