"""Accounts, suspensions, browser logins, realm admins and reports, in SQL.

A mixin of the synchronous store cores (:class:`chatproto.store.sqlite.SQLiteDB`,
:class:`chatproto.store.postgresql.PostgresDB`), like
:class:`chatproto.store.reading.ReadingSQL`: the same statements on both, written with
``?`` placeholders.  Where the dialects differ the core says how through a few hooks
(:meth:`AccountsSQL._run`, :meth:`AccountsSQL._text_in`,
:meth:`AccountsSQL._text_out`, :attr:`AccountsSQL.ITEMS_TOP`,
``AccountsSQL.DUPLICATE``).

An account is its name and its floor (``chatproto.store``): suspensions, admins and
browser logins name both, so none of them outlives the account it was given to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatproto.envelope import Envelope
from chatproto.store import (
    REPORT_FIELDS,
    NoSuchAccount,
    UserExists,
    report_row,
    stored_number,
)

__all__ = ["AccountsSQL"]


class AccountsSQL:
    """The account statements of the SQL backends.  Hooks: :meth:`_run` runs one
    statement written with ``?`` placeholders and returns its cursor (:meth:`_run_many`
    one for many rows);
    :meth:`_text_in` / :meth:`_text_out` store and read back a client's free text;
    :attr:`ITEMS_TOP` is an SQL expression for the highest position drawn so far (a
    new account's floor); ``DUPLICATE`` the error a taken primary key raises.
    ``commit_batch`` is the core's (an account is deleted inside a group commit)."""

    ITEMS_TOP = ""
    DUPLICATE: type[Exception] = Exception

    commit_batch: Any

    def _run(self, sql: str, params: Sequence[Any] = ()) -> Any:
        raise NotImplementedError

    def _run_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> int:
        """Run one statement for each of ``rows`` (one ``executemany``); returns the
        rows they changed, in all."""
        raise NotImplementedError

    def _text_in(self, text: str) -> str:
        return text

    def _text_out(self, text: Any) -> str:
        return str(text)

    # accounts -----------------------------------------------------------------------

    def create_user(self, name: str, pwhash: str, ts: float) -> None:
        try:
            self._run(
                "INSERT INTO users (name, pwhash, created, floor) "
                f"VALUES (?, ?, ?, {self.ITEMS_TOP})",
                (name, pwhash, ts),
            )
        except self.DUPLICATE:
            raise UserExists(name) from None

    def user_floor(self, name: str) -> int | None:
        row = self._run("SELECT floor FROM users WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else None

    def password_hash(self, name: str) -> str | None:
        row = self._run("SELECT pwhash FROM users WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_password(self, name: str, pwhash: str) -> bool:
        cur = self._run("UPDATE users SET pwhash = ? WHERE name = ?", (pwhash, name))
        return bool(cur.rowcount > 0)

    def user_floors(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in self._run("SELECT name, floor FROM users")}

    def list_users(self) -> list[str]:
        return [r[0] for r in self._run("SELECT name FROM users ORDER BY name")]

    def delete_user(
        self,
        name: str,
        address: str,
        items: Sequence[Envelope] = (),
        outbox: Sequence[tuple[str, Envelope | dict[str, Any]]] = (),
    ) -> bool:
        """Delete an account with the items ending its standing (one transaction, see
        ``IStore.delete_user``); ``items`` get their positions.  True if it existed."""
        out, _ = self.commit_batch([items], {}, [outbox], [False], None, [(name, address)])
        if isinstance(out[0], NoSuchAccount):
            return False
        if isinstance(out[0], Exception):
            raise out[0]
        for env, pos in zip(items, out[0], strict=True):
            env.pos = pos
        return True

    # suspensions (issue 18) -----------------------------------------------------------

    def suspend_user(self, name: str, reason: str, ts: float) -> bool:
        cur = self._run(
            "INSERT INTO suspensions (name, floor, reason, ts) "
            "SELECT name, floor, ?, ? FROM users WHERE name = ? "
            "ON CONFLICT (name) DO UPDATE SET floor = excluded.floor, "
            "reason = excluded.reason, ts = excluded.ts",
            (self._text_in(reason), ts, name),
        )
        return bool(cur.rowcount > 0)

    def unsuspend_user(self, name: str) -> bool:
        return self._end_standing("suspensions", name)

    def _end_standing(self, table: str, name: str) -> bool:
        """Delete the row of ``table`` (suspensions, admins) given to account ``name``
        -- to its current floor; true if there was one."""
        cur = self._run(
            f"DELETE FROM {table} WHERE name = ? "
            "AND floor = (SELECT floor FROM users WHERE name = ?)",
            (name, name),
        )
        return bool(cur.rowcount > 0)

    def suspensions(self) -> dict[str, tuple[str, float]]:
        rows = self._run(
            "SELECT s.name, s.reason, s.ts FROM suspensions s "
            "JOIN users u ON u.name = s.name AND u.floor = s.floor"
        )
        return {str(r[0]): (self._text_out(r[1]), stored_number(r[2]) or 0.0) for r in rows}

    # browser logins, admins, reports (issue 18) --------------------------------------

    def put_session_token(
        self, digest: str, name: str, floor: int, device: str, created: float, last_used: float
    ) -> None:
        self._run(
            "INSERT INTO session_tokens (digest, name, floor, device, created, last_used) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (digest) DO UPDATE SET "
            "name = excluded.name, floor = excluded.floor, device = excluded.device, "
            "created = excluded.created, last_used = excluded.last_used",
            (digest, name, floor, self._text_in(device), created, last_used),
        )

    def touch_session_token(self, digest: str, last_used: float) -> None:
        self._run(
            "UPDATE session_tokens SET last_used = ? WHERE digest = ? AND last_used < ?",
            (last_used, digest, last_used),
        )

    def delete_session_tokens(self, digests: Sequence[str]) -> int:
        if not digests:
            return 0
        return self._run_many(
            "DELETE FROM session_tokens WHERE digest = ?", [(d,) for d in digests]
        )

    def delete_user_session_tokens(self, name: str) -> int:
        return int(self._run("DELETE FROM session_tokens WHERE name = ?", (name,)).rowcount)

    def session_tokens(
        self, name: str | None = None
    ) -> list[tuple[str, str, int, str, float, float]]:
        only = "" if name is None else "WHERE t.name = ? "
        return self._token_rows(f"{only}ORDER BY t.last_used", () if name is None else (name,))

    def session_token(self, digest: str) -> tuple[str, str, int, str, float, float] | None:
        rows = self._token_rows("WHERE t.digest = ?", (digest,))
        return rows[0] if rows else None

    def _token_rows(
        self, where: str, params: Sequence[Any]
    ) -> list[tuple[str, str, int, str, float, float]]:
        rows = self._run(
            "SELECT t.digest, t.name, t.floor, t.device, t.created, t.last_used "
            "FROM session_tokens t JOIN users u ON u.name = t.name AND u.floor = t.floor " + where,
            params,
        )
        return [
            (
                str(r[0]),
                str(r[1]),
                int(r[2]),
                self._text_out(r[3]),
                stored_number(r[4]) or 0.0,
                stored_number(r[5]) or 0.0,
            )
            for r in rows
        ]

    def expire_session_tokens(self, before: float) -> int:
        return int(
            self._run(
                "DELETE FROM session_tokens WHERE last_used < ? "
                "OR NOT EXISTS (SELECT 1 FROM users u WHERE u.name = session_tokens.name "
                "AND u.floor = session_tokens.floor)",
                (before,),
            ).rowcount
        )

    def grant_admin(self, name: str, ts: float) -> bool:
        cur = self._run(
            "INSERT INTO admins (name, floor, ts) SELECT name, floor, ? FROM users "
            "WHERE name = ? ON CONFLICT (name) DO UPDATE SET floor = excluded.floor, "
            "ts = excluded.ts",
            (ts, name),
        )
        return bool(cur.rowcount > 0)

    def revoke_admin(self, name: str) -> bool:
        return self._end_standing("admins", name)

    def admins(self) -> dict[str, float]:
        rows = self._run(
            "SELECT a.name, a.ts FROM admins a "
            "JOIN users u ON u.name = a.name AND u.floor = a.floor"
        )
        return {str(r[0]): stored_number(r[1]) or 0.0 for r in rows}

    def add_report(self, report: dict[str, Any]) -> int:
        values = [report[k] for k in REPORT_FIELDS[1:]]
        values[2] = self._text_in(values[2])  # reason
        values[7] = self._text_in(values[7])  # excerpt
        row = self._run(
            "INSERT INTO reports (reporter, msg_id, reason, ts, sender, recipient, pos, "
            "excerpt) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            tuple(values),
        ).fetchone()
        return int(row[0])

    def reports(self, before: int | None, limit: int) -> list[dict[str, Any]]:
        rows = self._run(
            f"SELECT {', '.join(REPORT_FIELDS)} FROM reports WHERE id < ? ORDER BY id DESC LIMIT ?",
            (before if before is not None else 2**63 - 1, limit),
        )
        out = []
        for r in rows:
            rep = report_row(r)
            rep["reason"] = self._text_out(rep["reason"])
            rep["excerpt"] = self._text_out(rep["excerpt"])
            out.append(rep)
        return out
