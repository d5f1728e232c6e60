"""The file records and upload bookkeeping of the SQL stores, in SQL.

A mixin of the synchronous store cores (:class:`chatproto.store.sqlite.SQLiteDB`,
:class:`chatproto.store.postgresql.PostgresDB`), like
:class:`chatproto.store.accounts.AccountsSQL`: the same statements on both, written
with ``?`` placeholders and run by the core's ``_run``; free text goes through the
core's ``_text_in`` / ``_text_out``.  A file's record is written with its item, in
the group commit (each core's ``_index_files``); expiry and the upload upsert are the
core's own (their transactions and upsert differ).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from chatproto.envelope import shown_ts
from chatproto.store import FILE_META

__all__ = ["FilesSQL"]

_FILE_FIELDS = (*FILE_META, "sender", "recipient", "ts", "pos")


class FilesSQL:
    """``IStore``'s file reads and upload listing of the SQL backends."""

    _run: Callable[..., Any]
    _text_in: Callable[[str], str]
    _text_out: Callable[[Any], str]

    def file_info(self, file_id: str) -> dict[str, Any] | None:
        row = self._run(
            f"SELECT {', '.join(_FILE_FIELDS)} FROM files WHERE file_id = ?",
            (self._text_in(file_id),),
        ).fetchone()
        if row is None:
            return None
        rec = dict(zip(_FILE_FIELDS, row, strict=True))
        for k in ("file_id", "name", "media_type"):
            rec[k] = self._text_out(rec[k])
        rec["ts"] = shown_ts(rec["ts"])
        return rec

    def file_usage(self, sender: str, after: int = 0) -> int:
        row = self._run(
            "SELECT coalesce(sum(size), 0) FROM files WHERE sender = ? AND pos > ?",
            (sender, after),
        ).fetchone()
        return int(row[0]) if row else 0

    def blob_referenced(self, sha256: str) -> bool:
        row = self._run("SELECT 1 FROM files WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
        return row is not None

    def delete_upload(self, upload_id: str) -> None:
        self._run("DELETE FROM uploads WHERE upload_id = ?", (self._text_in(upload_id),))

    def list_uploads(self) -> list[dict[str, Any]]:
        rows = self._run("SELECT record FROM uploads ORDER BY upload_id").fetchall()
        return [json.loads(r[0]) for r in rows]
