"""How ``chatrealmctl`` reaches a realm: the running realm's control channel, or else
its store; and how it reports a failure (one line, a status).

Every command of :mod:`chatproto.ctl` (and of :mod:`chatproto.ctlmoderation`) acts
through the running realm when there is one (:func:`running_realm`), so a change
takes effect at once, and otherwise on the store (:func:`open_db`), saying which it did.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from chatproto import config as configmod
from chatproto.address import normalise_name
from chatproto.errors import ChatError
from chatproto.ops import commands, controlclient
from chatproto.ops.controlclient import ControlClient
from chatproto.store import backend as store_backend
from chatproto.store.groupcommit import StoreDB

T = TypeVar("T")

__all__ = [
    "EXIT_FAILED",
    "EXIT_USAGE",
    "IN_STORE",
    "IN_STORE_UNREACHABLE",
    "CtlError",
    "ask",
    "by_realm",
    "first_line",
    "in_store",
    "name_arg",
    "open_db",
    "running_or_fail",
    "running_realm",
    "store_exists",
]

EXIT_FAILED = 1
EXIT_USAGE = 2


class CtlError(Exception):
    """A failure to report as one line: ``chatrealmctl: <message>``."""

    def __init__(self, message: str, status: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _driver_errors(cfg: configmod.Config) -> tuple[type[BaseException], ...]:
    """The exceptions the configured store's driver raises (reported as one line)."""
    if cfg.storage.backend == "postgresql":
        import psycopg

        return (sqlite3.Error, OSError, psycopg.Error)
    return (sqlite3.Error, OSError)


@contextmanager
def open_db(cfg: configmod.Config, create: bool = False) -> Iterator[StoreDB]:
    """Open (and migrate) the realm's store; without ``create`` it must exist.

    Refusing to create it for read/modify commands turns a wrong ``--data-dir`` (or
    ``storage.schema``) into a clear error instead of an empty store somewhere
    unexpected.
    """
    where = store_backend.describe(cfg)
    errors = _driver_errors(cfg)
    try:
        db = store_backend.connect(cfg, create=create)
    except store_backend.StoreMissing:
        if cfg.storage.backend == "postgresql":
            raise CtlError(
                f"no chatproto store in {where} (wrong --config or storage.schema? the "
                "realm creates it on first start, and so do adduser and migrate-store)"
            ) from None
        raise CtlError(
            f"no database at {where} (wrong --config or --data-dir? "
            "the realm creates it on first start, and so does adduser)"
        ) from None
    except RuntimeError as e:  # cannot connect; schema newer than this chatproto
        raise CtlError(str(e)) from None
    except errors as e:
        raise CtlError(f"cannot open database {where}: {first_line(e)}") from None
    try:
        yield db
    except errors as e:
        raise CtlError(f"database {where}: {first_line(e)}") from None
    finally:
        db.close()


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def store_exists(cfg: configmod.Config) -> bool:
    """Whether the configured store has been created (a CtlError if it cannot be
    reached)."""
    try:
        return store_backend.exists(cfg)
    except RuntimeError as e:
        raise CtlError(str(e)) from None
    except _driver_errors(cfg) as e:
        raise CtlError(
            f"cannot open database {store_backend.describe(cfg)}: {first_line(e)}"
        ) from None


def name_arg(text: str) -> str:
    try:
        return normalise_name(text)
    except ChatError as e:
        raise CtlError(e.message) from None


# the running realm (the control channel, chatproto.ops) ---------------------------------

#: How a change made in the store, not by the realm, is reported.
IN_STORE = "in the store (the realm is not running)"
#: ... when the configuration turns the control channel off: the realm may run.
IN_STORE_UNREACHABLE = "in the store (the control channel is off: a running realm is not told)"


def in_store(cfg: configmod.Config) -> str:
    """The words saying a change was made in the store, not by a running realm."""
    return IN_STORE if cfg.control.enabled else IN_STORE_UNREACHABLE


def running_realm(cfg: configmod.Config) -> ControlClient | None:
    """A connection to the running realm, or None when it is not running (then the
    store may be changed directly).  A realm that runs but cannot be reached from here
    (another user's socket, a refused token) is an error: nothing is changed behind
    its back."""
    try:
        return controlclient.connect(cfg)
    except controlclient.NotRunning:
        return None
    except controlclient.Unreachable as e:
        raise CtlError(f"the realm is running, but: {e}") from None


def running_or_fail(cfg: configmod.Config) -> ControlClient:
    client = running_realm(cfg)
    if client is None and not cfg.control.enabled:  # it may well run: unreachable
        raise CtlError(
            "this needs the running realm, reached over its control channel, which this "
            "configuration turns off ([control] enabled = false)"
        )
    if client is None:
        raise CtlError(f"the realm is not running (no control socket at {cfg.control_socket})")
    return client


def ask(client: ControlClient, command: Any, timeout: float = 30.0, **kw: Any) -> Any:
    """``command``'s answer, a refusal of the realm's as a one-line error."""
    try:
        return client.call(command, timeout=timeout, **kw)
    except commands.ControlError as e:
        code, _, message = str(e).partition(": ")
        if code == "no_such_user":
            raise CtlError(message) from None
        raise CtlError(message or code) from None
    except controlclient.Unreachable as e:
        raise CtlError(f"the running realm: {e}") from None


def on_realm_or_store(
    cfg: configmod.Config,
    live: Callable[[ControlClient], T],
    offline: Callable[[StoreDB], T],
) -> tuple[T, str]:
    """``live(client)`` on the running realm, or ``offline(db)`` on the store when the
    realm is not running; with where it was done (the words ctl prints)."""
    client = running_realm(cfg)
    if client is not None:
        with client:
            return live(client), "by the running realm"
    with open_db(cfg) as db:
        return offline(db), in_store(cfg)


def by_realm(closed: int) -> str:
    return f"by the running realm ({closed} session{'' if closed == 1 else 's'} ended)"
