"""The signing keys of peer realms, in SQL.

A mixin of the synchronous store cores (:class:`chatproto.store.sqlite.SQLiteDB`,
:class:`chatproto.store.postgresql.PostgresDB`), like
:class:`chatproto.store.accounts.AccountsSQL`: the same statements on both, written
with ``?`` placeholders and run by the core's ``_run``.  The keys each peer realm last
announced are cached here so that a realm that restarts verifies their signatures
without asking them first (:class:`chatproto.signing.KeyRing` decides what to trust).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["PeerKeysSQL"]


class PeerKeysSQL:
    """``IStore.peer_keys`` and ``IStore.set_peer_keys`` of the SQL backends.
    ``_run`` is the core's (see :class:`chatproto.store.accounts.AccountsSQL`)."""

    _run: Callable[..., Any]

    def peer_keys(self) -> dict[str, list[dict[str, str]]]:
        rows = self._run("SELECT realm, keys FROM peer_keys ORDER BY realm").fetchall()
        return {r[0]: json.loads(r[1]) for r in rows}

    def set_peer_keys(self, realm: str, keys: list[dict[str, str]]) -> None:
        self._run(
            "INSERT INTO peer_keys VALUES (?, ?) "
            "ON CONFLICT (realm) DO UPDATE SET keys = excluded.keys",
            (realm, json.dumps(keys)),
        )
