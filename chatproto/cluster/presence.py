"""Presence across the workers of a cluster.

:class:`ClusterPresence` is the presence handler of :mod:`chatproto.realm.presence`
with a view of the other workers: a user is online when they have a visible session
on any worker.  Each worker publishes its own changes on the bus (channel
``presence``: a status change, or a change of the user's visible sessions here), and
the others tell their local sessions; the worker's part of the session directory is
also written to Redis with every heartbeat, and the parts of the others read back,
which corrects a worker that missed messages and makes the users of a worker that
died go offline within three heartbeats.

Known gap: two workers losing a user's last sessions at the same instant may each
think the other still has one, so neither says ``offline``; the next heartbeat's
directory then shows the user gone, and every worker tells its sessions.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from chatproto.realm.presence import Presence
from chatproto.realm.sessions import Session

__all__ = ["ClusterPresence"]


class ClusterPresence(Presence):
    """Presence whose "online" spans the workers (see the module docstring).

    ``publish(message)`` puts a JSON text on the bus's ``presence`` channel;
    ``worker`` is this worker's name.
    """

    def __init__(self, *args: Any, worker: str, publish: Callable[[str], None], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.worker = worker
        self._publish = publish
        #: user -> {other worker: visible sessions there}
        self.elsewhere: dict[str, dict[str, int]] = {}
        self._missing: set[tuple[str, str]] = set()

    # the view of the other workers ------------------------------------------------------

    def _there(self, user: str) -> int:
        return sum(self.elsewhere.get(user, {}).values())

    def online_count(self) -> int:
        return len(set(self.visible) | set(self.elsewhere))

    def of(self, user: str) -> tuple[str, str]:
        if user not in self.visible and user not in self.elsewhere:
            return ("offline", "")
        return self.status.get(user, ("online", ""))

    def is_online(self, user: str) -> bool:
        return user in self.elsewhere or super().is_online(user)

    def known(self, user: str) -> Any:
        if user in self.elsewhere and user not in self.visible:
            status, text = self.status.get(user, ("online", ""))
            return self.notice(user, status, text)
        return super().known(user)

    def who(self, users: Iterable[str] | None = None) -> list[dict[str, Any]]:
        if users is None:
            users = set(self.visible) | set(self.elsewhere)
        out = []
        for u in sorted(users):
            n = self.visible.get(u, 0) + self._there(u)
            if not n:
                out.extend(super().who([u]))  # a remote realm's user, as last told
                continue
            entry: dict[str, Any] = {"user": u, "sessions": n}
            status = self.status.get(u)
            if status:
                entry["status"] = status[0]
                if status[1]:
                    entry["text"] = status[1]
            out.append(entry)
        return out

    def local_audience(self, user: str) -> set[str]:
        """Local users who hear ``user``'s presence: fellow group members, and online
        users here who have a private conversation with them."""
        audience = self.group_fellows(user)
        audience.update(u for u, partners in self.partners.items() if user in partners)
        audience.discard(user)
        return audience

    # changes made here -------------------------------------------------------------------

    def broadcast(self, user: str, status: str, text: str) -> None:
        if status == "offline" and self._there(user):
            return  # still online on another worker
        super().broadcast(user, status, text)
        self._publish(json.dumps({"w": self.worker, "u": user, "s": status, "t": text}))

    def came_online(self, session: Session) -> Any:
        d = super().came_online(session)

        def counted(result: Any) -> Any:
            if session.counted:
                self._publish(json.dumps({"w": self.worker, "u": session.user_id, "d": 1}))
            return result

        return d.addCallback(counted)

    def went_offline(self, session: Session, last: bool) -> None:
        user = session.user_id
        counted = session.counted
        status = self.status.get(user)
        super().went_offline(session, last)
        if counted:
            self._publish(json.dumps({"w": self.worker, "u": user, "d": -1}))
            if status is not None and self._there(user) and user not in self.status:
                self.status[user] = status  # still online elsewhere, as they were

    # what the other workers say ------------------------------------------------------------

    def heard(self, message: str) -> None:
        """A message of another worker on the ``presence`` channel."""
        try:
            m = json.loads(message)
            worker, user = str(m["w"]), str(m["u"])
        except (ValueError, KeyError, TypeError):
            return
        if worker == self.worker:
            return
        if "d" in m:
            counts = self.elsewhere.setdefault(user, {})
            n = counts.get(worker, 0) + int(m["d"])
            if n > 0:
                counts[worker] = n
            else:
                counts.pop(worker, None)
                if not counts:
                    del self.elsewhere[user]
            return
        status, text = str(m.get("s", "")), str(m.get("t", ""))
        if status == "offline":
            self.elsewhere.pop(user, None)
            if user in self.visible:
                return  # online here: this worker says so
            self.status.pop(user, None)
        elif status == "online" and not text:
            self.status.pop(user, None)
        else:
            self.status[user] = (status, text)
        self._sessions.notify(self.local_audience(user), self.notice(user, status, text))

    def directory(self, others: dict[str, dict[str, int]]) -> None:
        """The live workers' parts of the session directory, as Redis has them now
        (``{worker: {user: visible sessions}}``).  The sessions of a worker that is no
        longer live are dropped at once; a user missing from a live worker's part
        twice in a row (a message missed) is dropped too, and one found there that no
        message announced is added.  Users no longer online anywhere go offline."""
        fresh: dict[str, dict[str, int]] = {}
        missing: set[tuple[str, str]] = set()
        for user, counts in self.elsewhere.items():
            for worker, n in counts.items():
                users = others.get(worker)
                if users is None:
                    continue  # that worker is gone
                if user in users or (user, worker) not in self._missing:
                    fresh.setdefault(user, {})[worker] = users.get(user, n)
                    if user not in users:
                        missing.add((user, worker))
        for worker, users in others.items():
            if worker == self.worker:
                continue
            for user, n in users.items():
                if n > 0:
                    fresh.setdefault(user, {})[worker] = n
        self._missing = missing
        gone = [u for u in self.elsewhere if u not in fresh and u not in self.visible]
        self.elsewhere = fresh
        for user in gone:
            self.status.pop(user, None)
            self._sessions.notify(self.local_audience(user), self.notice(user, "offline", ""))
