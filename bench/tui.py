"""Terminal client costs: how fast the TUI's model and widgets keep up with a stream.

    python bench/tui.py            # N = 1000, 10000
    python bench/tui.py --sizes 50000

For each N it measures, without a terminal or a realm (the client library's own cost is
measured by bench/run.py):

- ingest: N stream items (DMs from 20 partners and 5 groups) fed to ``ChatModel.receive``
  (filing, de-duplication, unread counts), items/s;
- first draw: ``ChatView.refresh`` + render at 120x40 of a conversation holding N/5
  items (what opening a busy conversation costs), ms;
- live message: one more item in that conversation, then refresh + render (the cost of
  each message shown while chatting), ms (median of 50).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatproto.tui import commands
from chatproto.tui.model import ChatModel
from chatproto.tui.view import ChatView


class _Controller:
    def __init__(self) -> None:
        self.completer = commands.Completer(lambda kind: [])

    def run(self, line: str) -> None:
        pass

    def older(self) -> None:
        pass


def _item(pos: int, busy: str) -> dict[str, Any]:
    if pos % 5 == 0:
        frm, to = "alice@x", busy
    elif pos % 2:
        frm, to = f"user{pos % 20}@x", "alice@x"
    else:
        frm, to = f"user{pos % 7}@x", f"#g{pos % 5}@x"
    return {
        "pos": pos,
        "msg_id": f"m{pos}",
        "kind": "text",
        "from": frm,
        "to": to,
        "ts": 1_767_225_600 + pos,
        "body": f"message number {pos} with a little text to wrap now and then",
    }


def measure(n: int) -> dict[str, float]:
    model = ChatModel()
    model.me, model.realm = "alice@x", "x"
    busy = "#busy@x"
    items = [_item(pos, busy) for pos in range(1, n + 1)]
    start = time.perf_counter()
    for item in items:
        model.receive(item)
    ingest = n / (time.perf_counter() - start)

    view = ChatView(model, _Controller())
    model.select(busy)
    start = time.perf_counter()
    view.refresh()
    view.render((120, 40))
    first = (time.perf_counter() - start) * 1000

    live = []
    for i in range(50):
        pos = n + 1 + i
        model.receive({**_item(pos, busy), "from": "bob@x", "to": busy})
        start = time.perf_counter()
        view.refresh()
        view.render((120, 40))
        live.append((time.perf_counter() - start) * 1000)
    return {
        "items": n,
        "shown": len(model.conversations[busy].items),
        "ingest/s": ingest,
        "first ms": first,
        "live ms": statistics.median(live),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000", help="comma-separated N")
    args = parser.parse_args()
    print(f"{'items':>8} {'in view':>8} {'ingest items/s':>15} {'open ms':>9} {'per msg ms':>11}")
    for n in (int(s) for s in args.sizes.split(",")):
        r = measure(n)
        print(
            f"{r['items']:>8} {r['shown']:>8} {r['ingest/s']:>15,.0f} {r['first ms']:>9.1f} "
            f"{r['live ms']:>11.2f}"
        )


if __name__ == "__main__":
    main()
