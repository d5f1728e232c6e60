"""The store a configuration names: ``[storage] backend`` is ``"sqlite"`` (the embedded
default, ``<data_dir>/realm.sqlite3``) or ``"postgresql"`` (``dsn`` and ``schema``).

``twistd chatrealm`` gets its :class:`chatproto.store.IStore` from :func:`make_store`;
``chatrealmctl`` gets the synchronous core (:class:`chatproto.store.groupcommit.StoreDB`)
from :func:`connect`.  The PostgreSQL module, and psycopg with it, is imported only
when the configuration asks for it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from chatproto.store.sqlite import SQLiteDB, SQLiteStore

if TYPE_CHECKING:
    from chatproto.config import Config
    from chatproto.store import IStore
    from chatproto.store.groupcommit import StoreDB

__all__ = [
    "StoreMissing",
    "connect",
    "describe",
    "exists",
    "make_store",
]


class StoreMissing(Exception):
    """The configured store does not exist yet (and was not to be created)."""


def make_store(cfg: Config, reactor: Any, **kw: Any) -> IStore:
    """The realm's store, not yet opened.  ``kw`` goes to the backend's constructor
    (tests pass ``synchronous`` to SQLite)."""
    if cfg.storage.backend == "postgresql":
        from chatproto.store.postgresql import PostgresStore

        return PostgresStore(
            cfg.storage.dsn, cfg.storage.schema, reactor, worker=cfg.worker, realm=cfg.realm
        )
    kw.setdefault("synchronous", cfg.storage.synchronous)
    return SQLiteStore(cfg.database_path, reactor, **kw)


def describe(cfg: Config) -> str:
    """Where the store is, for messages: a file, or a server and schema (no password)."""
    if cfg.storage.backend == "postgresql":
        from chatproto.store.postgresql import describe_dsn

        return describe_dsn(cfg.storage.dsn, cfg.storage.schema)
    return os.path.abspath(cfg.database_path)


def exists(cfg: Config) -> bool:
    """Whether the store has been created (by the realm, ``adduser`` or
    ``migrate-store``).  For PostgreSQL this connects to the server."""
    if cfg.storage.backend == "postgresql":
        try:
            connect(cfg).close()
        except StoreMissing:
            return False
        return True
    return os.path.exists(cfg.database_path)


def connect(cfg: Config, create: bool = False) -> StoreDB:
    """Open (and migrate) the store's database synchronously; without ``create`` it
    must exist already (:class:`StoreMissing`), so a wrong ``--data-dir`` or
    ``schema`` is an error instead of an empty store somewhere unexpected.  Other
    failures raise ``RuntimeError`` (a readable message) or the driver's error."""
    if cfg.storage.backend == "postgresql":
        from chatproto.store.postgresql import PostgresDB

        try:
            pg = PostgresDB(cfg.storage.dsn, cfg.storage.schema, create=create)
        except RuntimeError as e:
            if not create and str(e).startswith("no schema"):
                raise StoreMissing(str(e)) from None
            raise
        try:
            if not create and pg.version() == 0:
                raise StoreMissing(f"no chatproto store in {pg.describe()}")
            pg.migrate()
        except BaseException:
            pg.close()
            raise
        return pg
    path = cfg.database_path
    if not create and not os.path.exists(path):
        raise StoreMissing(f"no database at {os.path.abspath(path)}")
    db = SQLiteDB(path, cfg.storage.synchronous)
    try:
        db.migrate()
    except BaseException:
        db.close()
        raise
    return db
