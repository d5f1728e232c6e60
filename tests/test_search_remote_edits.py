"""An edit from another realm that arrives before the item it edits (out of order):
the realm refuses it (``not_found``, see chatproto.realm.relations.check_remote) and
stores nothing, so no store ever holds an edit positioned before its item -- what the
search indexes of SQLite and PostgreSQL (``_CURRENT_TEXTS``, ``_INDEX_RANGE``: the
edits after the range's start) take for granted.  When the item then arrives, every
store finds it by its own text, before and after it is indexed, and never by the
refused edit's."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor as _reactor
from twisted.internet import task

from chatproto import config, tls
from chatproto.federation import FederationService
from chatproto.realm import RealmService
from chatproto.testing import InlineHasher
from tests.test_store import _memory, _postgresql, _sqlite

BOB = "bob@b.example"
NOW = time.time()


def _wire(item_id: str, kind: str, body: str, meta: dict[str, Any] | None = None) -> Any:
    item = {"id": item_id, "kind": kind, "from": "alice@a.example", "to": BOB, "ts": NOW}
    item["body"] = body
    if meta is not None:
        item["meta"] = meta
    return item


@pytest.fixture(params=[_sqlite, _memory, _postgresql], ids=["sqlite", "memory", "postgresql"])
def realm(request: Any, tmp_path: Path) -> Any:
    store = request.param(tmp_path)  # the realm opens it, and closes it when it stops
    paths = tls.write_dev_certs(str(tmp_path / "certs"), "b.example")
    cfg = config.Config(realm="b.example", data_dir=str(tmp_path / "b.example"))
    f = cfg.federation
    f.enabled, f.certificate, f.private_key, f.ca = True, paths["cert"], paths["key"], paths["ca"]
    cfg.check()
    clock = task.Clock()
    clock.advance(NOW)
    r = RealmService(cfg, store, _reactor, clock=clock, hasher=InlineHasher())
    FederationService(r, clock, clock=clock, status_path="")
    pytest_twisted.blockon(r.startService())
    pytest_twisted.blockon(r.accounts.create_user("bob", "password-1"))
    yield r
    pytest_twisted.blockon(r.stopService())


def _indexed(store: Any) -> Any:
    """The store's search index position (None for the memory store: no index)."""
    if not hasattr(store, "_read"):
        return None
    return store._read(lambda db: db.search_upto())


@pytest_twisted.inlineCallbacks
def test_an_edit_before_its_item_is_refused_and_search_finds_the_items_own_text(
    realm: Any,
) -> Any:
    store, mine = realm.store, [("user", BOB, 0)]
    edit = _wire("zqx-edit", "edit", "zqxedited words", {"ref": "zqx-item"})
    item = _wire("zqx-item", "text", "zqxoriginal words")
    # the edit first, in a transaction of its own, then in one with the item after it
    rejected = yield realm.receive_remote("a.example", [edit])
    assert [(r["id"], r["code"]) for r in rejected] == [("zqx-edit", "not_found")]
    rejected = yield realm.receive_remote("a.example", [dict(edit), item])
    assert [(r["id"], r["code"]) for r in rejected] == [("zqx-edit", "not_found")]
    assert (yield store.stored_item("zqx-edit")) is None
    stored = yield store.stored_item("zqx-item")
    assert stored is not None and stored.body == "zqxoriginal words"
    for _ in range(2):  # read directly (not indexed yet, where there is an index), then indexed
        found = yield store.search(["zqxoriginal"], mine, None, 10)
        assert [e.id for e in found] == ["zqx-item"]
        assert (yield store.search(["zqxedited"], mine, None, 10)) == []
        if (yield _indexed(store)) is None:
            break
        for _ in range(200):  # bounded: 10 s
            if (yield _indexed(store)) >= stored.pos:
                break
            yield task.deferLater(_reactor, 0.05, lambda: None)
        assert (yield _indexed(store)) >= stored.pos
    # the edit sent again once its item is here: applied, and found by its text
    rejected = yield realm.receive_remote("a.example", [dict(edit)])
    assert rejected == []
    found = yield store.search(["zqxedited"], mine, None, 10)
    assert [e.id for e in found] == ["zqx-item"]
    assert (yield store.search(["zqxoriginal"], mine, None, 10)) == []
