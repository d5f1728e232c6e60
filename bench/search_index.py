# ruff: noqa: E501
"""What the search index costs the SQLite store (issue 17): same run, A/B.

    python bench/search_index.py [--batch 300] [--rounds 40] [--synchronous FULL]

Two databases at the current schema; in one the search triggers (edits, erasures) are
dropped.  Both get the same group commits (``SQLiteDB.append_batch`` with one
single-item batch per send, as the realm makes them; bodies of 6-20 words),
alternating round by round so both see the same machine load; the indexed one is then
indexed as the store does when idle (``index_search`` in steps of INDEX_STEP items).
Prints us/item of the commit path for each (the index adds nothing to it: no trigger
fires on an insert) and of the indexing, done off the send path.

(With a trigger per insert, as first built, tokenizing in the commit cost about 25 us
of CPU per item, as much as the rest of the commit path, and halved DM throughput in
bench/run.py; indexing in bulk costs a few us per item.)
"""

import argparse
import os
import random
import sys
import tempfile
import time

from chatproto.envelope import Envelope, new_message_id
from chatproto.store.groupcommit import INDEX_STEP
from chatproto.store.sqlite import SQLiteDB

WORDS = (
    "the a lunch meeting deploy release tomorrow today ok thanks please review patch "
    "build failed green red coffee team channel alice bob carol message link docs "
    "question answer maybe later now ship it merged branch main test flaky bench"
).split()


def envs(n: int, rng: random.Random) -> list[Envelope]:
    return [
        Envelope(
            id=new_message_id(),
            kind="text",
            sender="a@localhost",
            recipient="b@localhost",
            ts=time.time(),
            body=" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 20))),
        )
        for _ in range(n)
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--synchronous", default="FULL")
    a = ap.parse_args()
    rng = random.Random(17)
    with tempfile.TemporaryDirectory() as d:
        dbs = {}
        for name in ("indexed", "no index"):
            db = SQLiteDB(os.path.join(d, f"{name.replace(' ', '-')}.sqlite3"), a.synchronous)
            db.migrate()
            if name == "no index":
                for trigger in ("erase", "delete"):
                    db.conn.execute(f"DROP TRIGGER items_fts_{trigger}")
            dbs[name] = db
        spent = {name: [0.0, 0.0] for name in dbs}
        indexing = [0.0, 0.0]
        for r in range(a.rounds):
            order = list(dbs) if r % 2 == 0 else list(reversed(list(dbs)))
            for name in order:
                batch = [[e] for e in envs(a.batch, rng)]
                t, c = time.perf_counter(), time.process_time()
                dbs[name].append_batch(batch, {("b@localhost", "x"): 1})
                spent[name][0] += time.perf_counter() - t
                spent[name][1] += time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            while dbs["indexed"].index_search(INDEX_STEP) == INDEX_STEP:
                pass
            indexing[0] += time.perf_counter() - t
            indexing[1] += time.process_time() - c
        n = a.batch * a.rounds
        for name, (wall, cpu) in spent.items():
            print(
                f"commit path, {name:>8}: {1e6 * wall / n:6.1f} us/item wall, {1e6 * cpu / n:6.1f} us/item CPU"
                f" ({a.rounds} commits of {a.batch} sends, synchronous={a.synchronous})"
            )
        (w1, c1), (w0, c0) = spent["indexed"], spent["no index"]
        print(
            f"commit path difference: {1e6 * (w1 - w0) / n:+.1f} us/item wall, "
            f"{1e6 * (c1 - c0) / n:+.1f} us/item CPU"
        )
        print(
            f"indexing when idle (steps of {INDEX_STEP}): {1e6 * indexing[0] / n:6.1f} us/item wall, "
            f"{1e6 * indexing[1] / n:6.1f} us/item CPU"
        )
        hits = dbs["indexed"].search(["lunch", "deploy"], [("user", "a@localhost", 0)], None, 50)
        print(f"(a search for 'lunch deploy' finds {len(hits)} of the newest items)")
        for db in dbs.values():
            db.close()


if __name__ == "__main__":
    sys.exit(main())
