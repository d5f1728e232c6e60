"""An in-memory :class:`chatproto.store.IStore`: for tests and embedding experiments.

Same contract as the SQLite store (positions assigned at append, never reused), but
nothing survives the process and every Deferred has already fired, so tests built on
it need no threads and no reactor (use ``successResultOf``).
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Sequence
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from chatproto.envelope import Envelope, alternate_id, alternate_range
from chatproto.mentions import mentions
from chatproto.relations import DELETED_META, REF_KINDS, TARGET_KINDS, current_view, ref_of
from chatproto.store import (
    MAX_DEVICES,
    REPORT_FIELDS,
    IStore,
    UserExists,
    Waiter,
    file_record,
)
from chatproto.store.reading import (
    SEARCH_KINDS,
    UNREAD_KINDS,
    alternate_of,
    conversation_summary,
    words_match,
)

__all__ = [
    "MemoryStore",
]


@implementer(IStore)
class MemoryStore:
    path = ":memory:"
    #: The most devices per user whose acks are kept (see IStore.set_ack).
    max_devices = MAX_DEVICES

    def __init__(self) -> None:
        self.users: dict[str, str] = {}
        self.floors: dict[str, int] = {}
        #: name -> (floor of the suspended account, reason, ts)
        self.suspended: dict[str, tuple[int, str, float]] = {}
        self.items: list[Envelope] = []
        #: Acks: user -> device -> position (see :attr:`acks`).
        self._acks: dict[str, dict[str, int]] = {}
        self.files: dict[str, dict[str, Any]] = {}
        self.uploads: dict[str, dict[str, Any]] = {}
        self._pos = 0
        #: id -> (sender, recipient) of every stored item
        self._ids: dict[str, tuple[str, str]] = {}
        self._id_key = os.urandom(16)
        #: Federation outbox: (seq, realm, envelope or request), oldest first.
        self.outbox: list[tuple[int, str, Any]] = []
        self._seq = 0
        #: Group requests sent to other realms and not yet answered: id -> request.
        self.requests: dict[str, dict[str, Any]] = {}
        #: Keys announced by peer realms: realm -> [{"id", "ed25519"}].
        self.keys: dict[str, list[dict[str, str]]] = {}
        #: Browser logins: digest -> (name, floor, device, created, last_used).
        self.session_tokens_: dict[str, tuple[str, int, str, float, float]] = {}
        #: Realm administrators: name -> (floor, ts granted).
        self.admins_: dict[str, tuple[int, float]] = {}
        #: Abuse reports, oldest first.
        self.reports_: list[dict[str, Any]] = []
        #: Read markers: (user, conversation) -> position.
        self.reads: dict[tuple[str, str], int] = {}
        #: Preferences: (user, key) -> value.
        self.user_prefs: dict[tuple[str, str], str] = {}

    def open(self) -> Deferred[None]:
        return succeed(None)

    def close(self) -> Deferred[None]:
        return succeed(None)

    def create_user(self, name: str, pwhash: str, ts: float) -> Deferred[None]:
        if name in self.users:
            return fail(UserExists(name))
        self.users[name] = pwhash
        self.floors[name] = self._pos
        return succeed(None)

    def user_floor(self, name: str) -> Deferred[int | None]:
        return succeed(self.floors.get(name) if name in self.users else None)

    def password_hash(self, name: str) -> Deferred[str | None]:
        return succeed(self.users.get(name))

    def set_password(self, name: str, pwhash: str) -> Deferred[bool]:
        if name not in self.users:
            return succeed(False)
        self.users[name] = pwhash
        return succeed(True)

    def user_floors(self) -> Deferred[dict[str, int]]:
        return succeed({name: self.floors[name] for name in self.users})

    def suspend_user(self, name: str, reason: str, ts: float) -> Deferred[bool]:
        if name not in self.users:
            return succeed(False)
        self.suspended[name] = (self.floors[name], reason, ts)
        return succeed(True)

    def unsuspend_user(self, name: str) -> Deferred[bool]:
        held = self.suspended.get(name)
        if held is None or name not in self.users or held[0] != self.floors[name]:
            return succeed(False)
        del self.suspended[name]
        return succeed(True)

    def suspensions(self) -> Deferred[dict[str, tuple[str, float]]]:
        return succeed(
            {
                name: (reason, ts)
                for name, (floor, reason, ts) in self.suspended.items()
                if name in self.users and self.floors[name] == floor
            }
        )

    def _is_account(self, name: str, floor: int) -> bool:
        return name in self.users and self.floors[name] == floor

    def put_session_token(
        self, digest: str, name: str, floor: int, device: str, created: float, last_used: float
    ) -> Deferred[None]:
        self.session_tokens_[digest] = (name, floor, device, created, last_used)
        return succeed(None)

    def touch_session_token(self, digest: str, last_used: float) -> Deferred[None]:
        row = self.session_tokens_.get(digest)
        if row is not None:
            self.session_tokens_[digest] = (*row[:4], max(row[4], last_used))
        return succeed(None)

    def delete_session_tokens(self, digests: Sequence[str]) -> Deferred[int]:
        return succeed(sum(self.session_tokens_.pop(d, None) is not None for d in digests))

    def delete_user_session_tokens(self, name: str) -> Deferred[int]:
        gone = [d for d, row in self.session_tokens_.items() if row[0] == name]
        return self.delete_session_tokens(gone)

    def session_tokens(
        self, name: str | None = None
    ) -> Deferred[list[tuple[str, str, int, str, float, float]]]:
        rows = [(d, *row) for d, row in self.session_tokens_.items()]
        rows = [r for r in rows if self._is_account(r[1], r[2]) and name in (None, r[1])]
        return succeed(sorted(rows, key=lambda r: r[5]))

    def session_token(
        self, digest: str
    ) -> Deferred[tuple[str, str, int, str, float, float] | None]:
        row = self.session_tokens_.get(digest)
        if row is None or not self._is_account(row[0], row[1]):
            return succeed(None)
        return succeed((digest, *row))

    def expire_session_tokens(self, before: float) -> Deferred[int]:
        gone = [
            d
            for d, row in self.session_tokens_.items()
            if row[4] < before or not self._is_account(row[0], row[1])
        ]
        return self.delete_session_tokens(gone)

    def grant_admin(self, name: str, ts: float) -> Deferred[bool]:
        if name not in self.users:
            return succeed(False)
        self.admins_[name] = (self.floors[name], ts)
        return succeed(True)

    def revoke_admin(self, name: str) -> Deferred[bool]:
        held = self.admins_.get(name)
        if held is None or not self._is_account(name, held[0]):
            return succeed(False)
        del self.admins_[name]
        return succeed(True)

    def admins(self) -> Deferred[dict[str, float]]:
        return succeed(
            {n: ts for n, (floor, ts) in self.admins_.items() if self._is_account(n, floor)}
        )

    def add_report(self, report: dict[str, Any]) -> Deferred[int]:
        rid = len(self.reports_) + 1
        self.reports_.append({**{k: report[k] for k in REPORT_FIELDS[1:]}, "id": rid})
        return succeed(rid)

    def reports(self, before: int | None, limit: int) -> Deferred[list[dict[str, Any]]]:
        rows = [r for r in reversed(self.reports_) if before is None or r["id"] < before]
        return succeed([{k: r[k] for k in REPORT_FIELDS} for r in rows[:limit]])

    def delete_user(
        self,
        name: str,
        address: str,
        items: Sequence[Envelope] = (),
        outbox: Sequence[tuple[str, Envelope | dict[str, Any]]] = (),
    ) -> Deferred[bool]:
        if name not in self.users:
            return succeed(False)
        for rid in [k for k, r in self.requests.items() if r.get("from") == address]:
            del self.requests[rid]  # an answer must not land on a later account
        if items:
            stored = self.append(items, outbox)
            failures: list[Any] = []
            stored.addErrback(failures.append)
            if failures:
                return fail(failures[0])
        elif outbox:
            self._queue(outbox)
        self._acks.pop(address, None)
        for upload_id in [k for k, r in self.uploads.items() if r.get("user") == address]:
            del self.uploads[upload_id]
        for rkey in [k for k in self.reads if k[0] == address]:
            del self.reads[rkey]
        for pkey in [k for k in self.user_prefs if k[0] == address]:
            del self.user_prefs[pkey]
        del self.users[name]
        self._pos += 1  # consumed: a later account of this name starts after it
        return succeed(True)

    def user_exists(self, name: str) -> Deferred[bool]:
        return succeed(name in self.users)

    def list_users(self) -> Deferred[list[str]]:
        return succeed(sorted(self.users))

    def append(
        self,
        items: Sequence[Envelope],
        outbox: Sequence[tuple[str, Envelope | dict[str, Any]]] = (),
    ) -> Deferred[list[Envelope]]:
        if any(env.id in self._ids for env in items):
            return fail(ValueError("UNIQUE constraint failed: items.id"))
        for env in items:
            self._store(env)
            if env.kind == "file" and env.meta is not None and "file_id" in env.meta:
                self.files[env.meta["file_id"]] = file_record(env)
        self._queue(outbox)
        return succeed(list(items))

    def append_to(
        self,
        waiter: Waiter,
        items: Sequence[Envelope],
        outbox: Sequence[tuple[str, Envelope | dict[str, Any]]] = (),
    ) -> None:
        self.append(items, outbox).addCallbacks(waiter.callback, waiter.errback)

    def _store(self, env: Envelope) -> None:
        self._pos += 1
        env.pos = self._pos
        self.items.append(env)
        self._ids[env.id] = (env.sender, env.recipient)
        if env.kind == "delete":
            self._wipe(env)
        elif env.kind == "edit":  # of an item deleted since the edit was checked
            target = self._by_id(ref_of(env) or "")
            if target is not None and target.meta == DELETED_META:
                env.body = ""

    def _wipe(self, env: Envelope) -> None:
        """A ``delete`` item is stored: its target (of the same conversation) loses
        its content, and its edits their bodies (as in the SQL stores)."""
        ref = ref_of(env)
        target = self._by_id(ref) if ref is not None else None
        if target is None or target.kind not in TARGET_KINDS:
            return
        if target.conversation != env.conversation:
            return
        if target.kind == "file" and target.meta is not None:
            self.files.pop(target.meta.get("file_id"), None)  # type: ignore[arg-type]
        target.body, target.meta, target.sig, target.frame = "", dict(DELETED_META), None, None
        for e in self.items:
            if e.kind == "edit" and ref_of(e) == ref:
                e.body, e.frame = "", None

    def _by_id(self, item_id: str) -> Envelope | None:
        if item_id not in self._ids:
            return None
        return next((e for e in self.items if e.id == item_id), None)

    def _refs(self, items: Sequence[Envelope]) -> list[Envelope]:
        ids = {e.id for e in items}
        return [e for e in self.items if e.kind in REF_KINDS and ref_of(e) in ids]

    def _queue(self, outbox: Sequence[tuple[str, Envelope | dict[str, Any]]]) -> None:
        for realm, env in outbox:
            if isinstance(env, dict) or env.pos:
                self._seq += 1
                self.outbox.append((self._seq, realm, env))
                if isinstance(env, dict) and env.get("kind") == "request":
                    self.requests.setdefault(str(env.get("id")), dict(env))

    def append_remote(
        self, items: Sequence[Envelope], outbox: Sequence[tuple[str, Envelope]] = ()
    ) -> Deferred[list[Envelope]]:
        stored = []
        for env in items:
            had = self._ids.get(env.id)
            if had is not None and had != (env.sender, env.recipient):
                env.id = alternate_id(env, self._id_key)  # its id was taken first
                had = self._ids.get(env.id)
            if had is None:
                self._store(env)
                stored.append(env)
                if env.kind == "file" and env.meta is not None and "file_id" in env.meta:
                    self.files[env.meta["file_id"]] = file_record(env)  # bytes fetched
        self._queue([(r, e) for r, e in outbox if e in stored])
        return succeed(stored)

    def outbox_enqueue(self, realm: str, payloads: Sequence[dict[str, Any]]) -> Deferred[None]:
        self._queue([(realm, dict(p)) for p in payloads])
        return succeed(None)

    def pending_requests(self, actor: str, group: str) -> Deferred[list[dict[str, Any]]]:
        found = [
            r for r in self.requests.values() if r.get("from") == actor and r.get("to") == group
        ]
        found.sort(key=lambda r: (_ts(r), str(r.get("id"))))
        return succeed([dict(r) for r in found])

    def request_done(self, request_id: str) -> Deferred[None]:
        self.requests.pop(request_id, None)
        return succeed(None)

    def expire_requests(self, before: float) -> Deferred[int]:
        old = [k for k, r in self.requests.items() if _ts(r) < before]
        for k in old:
            del self.requests[k]
        return succeed(len(old))

    def peer_keys(self) -> Deferred[dict[str, list[dict[str, str]]]]:
        return succeed({realm: [dict(k) for k in keys] for realm, keys in self.keys.items()})

    def set_peer_keys(self, realm: str, keys: list[dict[str, str]]) -> Deferred[None]:
        self.keys[realm] = [dict(k) for k in keys]
        return succeed(None)

    def stored_item(self, item_id: str) -> Deferred[Envelope | None]:
        return succeed(self._by_id(item_id))

    def stored_item_in(self, item_id: str, conversation: str) -> Deferred[Envelope | None]:
        env = self._by_id(item_id)
        if env is None or env.conversation != conversation:
            lo, hi = alternate_range(item_id)
            alts = [e for e in self.items if lo <= e.id <= hi and e.conversation == conversation]
            env = alternate_of(item_id, alts, self._id_key)
        return succeed(env)

    def ref_count(self, ref: str, sender: str) -> Deferred[int]:
        return succeed(
            sum(
                1
                for e in self.items
                if e.kind in ("edit", "reaction") and e.sender == sender and ref_of(e) == ref
            )
        )

    def outbox_read(self, realm: str, after: int, limit: int) -> Deferred[list[Any]]:
        out = [(seq, env) for seq, r, env in self.outbox if r == realm and seq > after]
        return succeed(out[:limit])

    def outbox_ack(self, realm: str, seq: int) -> Deferred[None]:
        self.outbox = [q for q in self.outbox if not (q[1] == realm and q[0] <= seq)]
        return succeed(None)

    def outbox_counts(self) -> Deferred[dict[str, int]]:
        counts: dict[str, int] = {}
        for _, realm, _env in self.outbox:
            counts[realm] = counts.get(realm, 0) + 1
        return succeed(counts)

    def outbox_stats(self) -> Deferred[dict[str, tuple[int, float | None]]]:
        stats: dict[str, tuple[int, float | None]] = {}
        for _, realm, env in self.outbox:  # oldest first
            n, ts = stats.get(realm, (0, None))
            if not n:
                ts = env.ts if isinstance(env, Envelope) else env.get("ts")
                ts = float(ts) if isinstance(ts, (int, float)) else None
            stats[realm] = (n + 1, ts)
        return succeed(stats)

    def outbox_holds(self, realm: str, pos: int) -> Deferred[bool]:
        return succeed(
            any(r == realm and isinstance(e, Envelope) and e.pos == pos for _, r, e in self.outbox)
        )

    def _after(self, pos: int) -> int:
        return bisect.bisect_right([e.pos for e in self.items], pos)

    def read_feed(
        self,
        user: str,
        after: int,
        limit: int,
        groups: Sequence[tuple[str, int, int | None]] = (),
    ) -> Deferred[list[Envelope]]:
        ranges: dict[str, list[tuple[int, int | None]]] = {}
        for g, lo, hi in groups:
            ranges.setdefault(g, []).append((lo, hi))
        out = []
        for e in self.items[self._after(after) :]:
            if e.recipient.startswith("#"):
                if not any(
                    lo < e.pos and (hi is None or e.pos <= hi)
                    for lo, hi in ranges.get(e.recipient, ())
                ):
                    continue
            elif user not in (e.recipient, e.sender):
                continue
            out.append(e)
            if len(out) == limit:
                break
        edits = [e for e in self._refs(out) if e.kind == "edit"]
        return succeed(current_view(out, edits, reactions=False))

    def read_events(self, after: int, limit: int) -> Deferred[list[Envelope]]:
        events = [e for e in self.items[self._after(after) :] if e.kind == "event"]
        return succeed(events[:limit])

    def conversation_partners(self, user: str, after: int = 0) -> Deferred[list[str]]:
        partners = set()
        for e in self.items[self._after(after) :]:
            if e.recipient.startswith("#") or e.sender == e.recipient:
                continue
            if e.sender == user:
                partners.add(e.recipient)
            elif e.recipient == user:
                partners.add(e.sender)
        return succeed(sorted(partners))

    def history(
        self,
        conversation: str,
        before: int | None,
        after: int | None,
        limit: int,
        floor: int = 0,
    ) -> Deferred[list[Envelope]]:
        conv = [
            e
            for e in self.items
            if e.conversation == conversation and e.pos > floor and e.kind not in REF_KINDS
        ]
        if after is not None:
            page = [e for e in conv if e.pos > after][:limit]
        else:
            bound = before if before is not None else 2**62
            page = [e for e in conv if e.pos < bound]
            page = page[-limit:] if limit else []
        return succeed(current_view(page, self._refs(page)))

    @property
    def acks(self) -> dict[tuple[str, str], int]:
        """Every stored ack, ``(user, device) -> position`` (a copy, for tests)."""
        return {(u, d): p for u, devices in self._acks.items() for d, p in devices.items()}

    def set_ack(self, user: str, device: str, pos: int) -> None:
        devices = self._acks.get(user)
        if devices is None:
            if pos <= 0:
                return
            devices = self._acks[user] = {}
        if pos > devices.get(device, 0):
            devices[device] = pos
        if len(devices) > self.max_devices:
            # the highest acks, then the first names (the SQL stores' ORDER BY)
            kept = sorted(devices.items(), key=lambda dp: (-dp[1], dp[0]))
            self._acks[user] = dict(kept[: max(1, self.max_devices)])

    def get_ack(self, user: str, device: str) -> Deferred[int]:
        devices = self._acks.get(user)
        if not devices:
            return succeed(0)
        if device in devices:
            return succeed(devices[device])
        return succeed(max(devices.values()))

    def max_pos(self) -> Deferred[int]:
        return succeed(self.items[-1].pos if self.items else 0)  # not a consumed one

    # read markers, conversations, preferences (see chatproto/store/reading.py) -------

    def set_read(self, user: str, conv: str, pos: int) -> None:
        if pos > self.reads.get((user, conv), 0):
            self.reads[(user, conv)] = pos

    def read_markers(self, conv: str) -> Deferred[dict[str, int]]:
        return succeed({u: p for (u, c), p in self.reads.items() if c == conv})

    def read_position(self, conv: str, before_ts: float, floor: int) -> Deferred[int]:
        for e in reversed(self.items):
            if e.pos <= floor:
                break
            if e.conversation == conv and e.ts < before_ts and e.kind not in REF_KINDS:
                return succeed(e.pos)
        return succeed(0)

    def conversations(
        self,
        user: str,
        floor: int,
        groups: Sequence[tuple[str, int]],
        name: str,
        limit: int,
    ) -> Deferred[list[dict[str, Any]]]:
        lows: dict[str, int] = dict(groups)
        last: dict[str, Envelope] = {}
        for e in self.items:
            conv = e.conversation
            if e.recipient.startswith("#"):
                if conv not in lows or e.pos <= lows[conv]:
                    continue
            elif user not in (e.sender, e.recipient) or e.pos <= floor:
                continue
            else:
                lows.setdefault(conv, floor)
            last[conv] = e
        chosen = sorted(last, key=lambda c: -last[c].pos)[:limit]
        # One pass over the markers and one over the items for all of them.
        markers: dict[str, dict[str, int]] = {conv: {} for conv in chosen}
        for (u, c), p in self.reads.items():
            if c in markers:
                markers[c][u] = p
        after = {conv: max(markers[conv].get(user, 0), lows[conv]) for conv in chosen}
        unread = dict.fromkeys(chosen, 0)
        mentioned = dict.fromkeys(chosen, 0)
        for e in self.items:
            conv = e.conversation
            if conv not in after or e.pos <= after[conv]:
                continue
            if e.sender == user or e.kind not in UNREAD_KINDS or e.meta == DELETED_META:
                continue
            unread[conv] += 1
            if conv.startswith("#") and e.kind == "text" and mentions(e.body, name):
                mentioned[conv] += 1
        return succeed(
            [
                conversation_summary(
                    conv,
                    last[conv],
                    markers[conv].get(user, 0),
                    unread[conv],
                    mentioned[conv],
                    markers[conv],
                )
                for conv in chosen
            ]
        )

    def search(
        self,
        words: Sequence[str],
        scopes: Sequence[tuple[str, str, int]],
        before: int | None,
        limit: int,
    ) -> Deferred[list[Envelope]]:
        def inside(e: Envelope) -> bool:
            for kind, what, lo in scopes:
                if e.pos <= lo:
                    continue
                if kind == "user":
                    if what in (e.sender, e.recipient) and not e.recipient.startswith("#"):
                        return True
                elif e.conversation == what:
                    return True
            return False

        bound = before if before is not None else 2**62
        out: list[Envelope] = []
        refs: dict[str | None, list[Envelope]] | None = None
        for e in reversed(self.items):
            if len(out) == limit:
                break
            if e.pos >= bound or e.kind not in SEARCH_KINDS or not words or not inside(e):
                continue
            if refs is None:  # the items about others, by what they refer to: one pass
                refs = {}
                for r in self.items:
                    if r.kind in REF_KINDS:
                        refs.setdefault(ref_of(r), []).append(r)
            [now] = current_view([e], refs.get(e.id, ()))
            if now.body and words_match(words, now.body):
                out.append(now)
        return succeed(out)

    def prefs(self, key: str) -> Deferred[dict[str, str]]:
        return succeed({u: v for (u, k), v in self.user_prefs.items() if k == key})

    def set_pref(self, user: str, key: str, value: str | None) -> Deferred[None]:
        if value is None:
            self.user_prefs.pop((user, key), None)
        else:
            self.user_prefs[(user, key)] = value
        return succeed(None)

    def file_info(self, file_id: str) -> Deferred[dict[str, Any] | None]:
        rec = self.files.get(file_id)
        return succeed(dict(rec) if rec is not None else None)

    def file_usage(self, sender: str, after: int = 0) -> Deferred[int]:
        return succeed(
            sum(
                f["size"] for f in self.files.values() if f["sender"] == sender and f["pos"] > after
            )
        )

    def expire_files(self, before: float) -> Deferred[list[str]]:
        gone = [k for k, f in self.files.items() if f["ts"] < before]
        digests = {self.files.pop(k)["sha256"] for k in gone}
        left = {f["sha256"] for f in self.files.values()}
        return succeed(sorted(digests - left))

    def blob_referenced(self, sha256: str) -> Deferred[bool]:
        return succeed(any(f["sha256"] == sha256 for f in self.files.values()))

    def put_upload(self, record: dict[str, Any]) -> Deferred[None]:
        self.uploads[record["upload_id"]] = dict(record)
        return succeed(None)

    def delete_upload(self, upload_id: str) -> Deferred[None]:
        self.uploads.pop(upload_id, None)
        return succeed(None)

    def list_uploads(self) -> Deferred[list[dict[str, Any]]]:
        return succeed([dict(r) for r in self.uploads.values()])

    def __repr__(self) -> str:
        return f"<MemoryStore {len(self.users)} users, {len(self.items)} items>"


def _ts(request: dict[str, Any]) -> float:
    ts = request.get("ts")
    return float(ts) if isinstance(ts, int | float) else 0.0
