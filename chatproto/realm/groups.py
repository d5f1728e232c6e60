"""The group handler: the commit path of group changes and group items.

The rules of groups (who may join, kick, set the topic...; group state as the replay
of its events) live in :mod:`chatproto.groups`; this handler applies them for the
realm: it resolves addresses, checks a change against the current state, commits it
with the outbox rows for the other realms concerned, applies it and routes it.
Changes to one group are serialised (a lock per group), so two concurrent requests
cannot both pass a check made against the same state.  A change to a group of another
realm is a request to that realm (see ``RealmService.forward_group_change``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredLock, fail, inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure

from chatproto import address
from chatproto.accounts import plan_removal
from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.groups import Group
from chatproto.ratelimit import ConnectionBuckets
from chatproto.store.grouprealms import queued_realms

if TYPE_CHECKING:
    from chatproto.realm.service import RealmService
    from chatproto.realm.sessions import Session

__all__ = ["GroupHandler"]


class GroupHandler:
    """Group changes, group items and what members may read of their groups."""

    log = Logger()

    def __init__(self, realm: RealmService) -> None:
        self._realm = realm
        self._name = realm.realm
        self._suffix = "@" + realm.realm
        self._rules = realm.groups
        self._locks: dict[str, DeferredLock] = {}
        #: group -> (realm, True) while the join of a user of another realm is being
        #: committed, (realm, False) while the removal of that realm's last member
        #: is: an item checked meanwhile is committed after it, so it goes to the
        #: realms of after it.  At most one a group: its changes commit one at a time.
        self._changing: dict[str, tuple[str, bool]] = {}
        #: each session's group-change bucket (see :meth:`change_by`)
        self._buckets = ConnectionBuckets()

    # addresses and reading ----------------------------------------------------------

    def address(self, text: Any, remote_ok: bool = False, by: str | None = None) -> str:
        """The canonical address of a group; one on another realm only with
        ``remote_ok`` (sending, changes, history) and federation with that realm
        (``by``, the user naming it: ``RealmService.check_remote``)."""
        if not isinstance(text, str):
            raise ChatError("bad_request", "field 'group' must be a string")
        addr = address.parse(text if text.startswith("#") else "#" + text, self._name, group=True)
        if not addr.is_local(self._name):
            if not remote_ok:
                raise ChatError("remote_realm", f"{addr} is on another realm")
            self._realm.check_remote(addr.realm, by)
        return str(addr)

    def list_public(self) -> list[dict[str, Any]]:
        """The public groups of this realm (not the mirrors of other realms' groups)."""
        return [
            g.summary()
            for addr, g in sorted(self._rules.groups.items())
            if g.visibility == "public" and not g.secret and addr.endswith(self._suffix)
        ]

    def readable(self, user: str, text: Any, public: bool = False) -> Group:
        """The group ``text`` names, for ``user`` to read: a group of this realm for
        its members (anyone, for a public one, with ``public``); a group on another
        realm, from its mirror, for its local members only.  This realm knows the
        groups of other realms that its own users are in, nothing else, so anyone
        else gets ``remote_realm`` (the home realm could answer; we do not ask it)."""
        addr = self.address(text, True, user)
        if addr.endswith(self._suffix):
            g = self._rules.get(addr)
            if not (public and g.visibility == "public" and not g.secret):
                self._rules.readable_from(addr, user)  # members only
            return g
        mirror = self._rules.groups.get(addr)
        if mirror is None or user not in mirror.members:
            raise ChatError(
                "remote_realm", f"{addr} is on another realm; its members here may ask about it"
            )
        return mirror

    def members(self, user: str, group: str) -> list[dict[str, Any]]:
        g = self.readable(user, group)
        online = self._realm.presence.is_online
        return [
            {"user": u, "role": m.role, "online": online(u)} for u, m in sorted(g.members.items())
        ]

    def info(self, user: str, group: str) -> dict[str, Any]:
        g = self.readable(user, group, public=True)
        info = g.summary()
        info["role"] = g.role_of(user)
        return info

    # changes --------------------------------------------------------------------------

    def change_by(self, session: Session, event: str, group: str, args: dict[str, Any]) -> Any:
        """:meth:`change` asked for by a client's ``session``.  It takes a token of the
        session's group-change bucket (``limits.group_change_rate`` and
        ``group_change_burst``: a change is a stored event and a frame to every
        member, so join/leave in a loop must be bounded), given back if the change
        is refused; an empty bucket answers ``rate_limited`` with ``retry_after``."""
        now = self._realm.clock.seconds()
        lim = self._realm.config.limits
        bucket = self._buckets.bucket(
            session, "group_change", lim.group_change_rate, lim.group_change_burst, now
        )
        wait = bucket.take(now)
        if wait:
            self._realm.stats.rate_limited("group_change")
            return fail(
                ChatError("rate_limited", "group changes too fast", retry_after=round(wait, 3))
            )

        def refused(f: Failure) -> Failure:
            bucket.refund()
            return f

        return self.change(session.user_id, event, group, args).addErrback(refused)

    def change(
        self, actor: str, event: str, group: str, args: dict[str, Any], item_id: str | None = None
    ) -> Any:
        """Check, commit, apply and route one change by local user ``actor`` (or, for
        a group of this realm, a user of another realm); fires with its envelope.
        ``item_id``: the id the event is stored under (a remote request's own, so that
        the request sent again is known: see ``RemoteIntake``), else a new one."""
        realm = self._realm
        try:
            addr = self.address(group, True, actor)
            if addr.endswith(self._suffix):

                def commit(actor: str, event: str, addr: str, args: dict[str, Any]) -> Any:
                    return self._commit(actor, event, addr, args, item_id)

            else:
                commit = realm.forward_group_change
            target = args.get("user")
            if target is not None:
                resolved = realm.messages.resolve_user(target, True, actor)
                if isinstance(resolved, Deferred):
                    return resolved.addCallback(
                        lambda a: commit(actor, event, addr, {**args, "user": str(a)})
                    )
                args = {**args, "user": str(resolved)}
            return commit(actor, event, addr, args)
        except ChatError as e:
            return fail(e)

    def _commit(
        self, actor: str, event: str, addr: str, args: dict[str, Any], item_id: str | None = None
    ) -> Deferred[Envelope]:
        """Changes to one group are checked and committed one at a time, so two
        concurrent requests (two creates of one name, two joins past the member limit)
        cannot both pass a check made against the same state."""
        lock = self._locks.get(addr)
        if lock is None:
            lock = self._locks[addr] = DeferredLock()

        def release(result: Any) -> Any:
            if not lock.locked and not lock.waiting:
                self._locks.pop(addr, None)
            return result

        d = lock.run(self._check_and_commit, actor, event, addr, args, item_id)
        return d.addBoth(release)

    def _check_and_commit(
        self, actor: str, event: str, addr: str, args: dict[str, Any], item_id: str | None
    ) -> Deferred[Envelope]:
        realm, rules = self._realm, self._rules
        meta = rules.check(event, addr, actor, **args)
        env = realm.messages.new_envelope(actor, addr, "event", "", meta)
        if item_id is not None:
            env.id = item_id
        group = rules.groups.get(addr)
        # Every realm with a member, the actor or the target gets the event (once).
        users = set(group.members) if group is not None else set()
        users.add(actor)
        if meta.get("user"):
            users.add(meta["user"])
        realms = sorted(realm.realms_of(users))
        queued: list[tuple[str, Any]] = [(r, env) for r in realms]
        joiner_realm = actor.rpartition("@")[2]
        if event == "joined" and group is not None and joiner_realm in realms:
            if not any(u.endswith("@" + joiner_realm) for u in group.members):
                # The joiner's realm has no member yet, so no mirror: its copy of the
                # event carries the group's state (before the join) to build one from.
                item = env.to_item()
                item["meta"] = {**meta, "snapshot": rules.snapshot(addr)}
                queued = [(r, item if r == joiner_realm else env) for r in realms]

        change = _realm_change(event, actor, meta, group, realms)
        if change is not None:
            self._changing[addr] = change
        queued += self._realms_note(addr, event, change)

        def changed(result: Any) -> Any:
            self._changing.pop(addr, None)
            return result

        def committed(_: object) -> Envelope:
            before = rules.audience(env)
            rules.apply(env)
            realm.route(env, before | rules.audience(env))
            if event == "joined":
                realm.presence.on_join(actor, addr)
            self.log.info(
                "group {group}: {event} by {actor}",
                group=addr,
                event=event,
                actor=actor,
            )
            for other in realms:
                realm.wake(env, other)
            return env

        d = realm.store.append([env], queued).addCallback(committed)
        return d.addBoth(changed) if change is not None else d

    @inlineCallbacks
    def end_standing(self, user: str, groups: Iterable[str], account: str | None = None) -> Any:
        """Commit, apply and route the events ending ``user``'s standing in ``groups``
        (a deleted account: :func:`chatproto.accounts.plan_removal`), holding those
        groups' locks so no other change interleaves.  With ``account``, that local
        account is deleted in the same transaction (``IStore.delete_user``); fires with
        whether it existed (else True)."""
        realm, rules = self._realm, self._rules
        addrs = sorted(set(groups))
        held: list[tuple[str, DeferredLock]] = []
        changing: list[str] = []
        try:
            for addr in addrs:  # always in this order: two removals cannot deadlock
                lock = self._locks.setdefault(addr, DeferredLock())
                yield lock.acquire()
                held.append((addr, lock))
            plan = plan_removal(
                rules, user, addrs, self._name, realm.realms_of, realm.clock.seconds()
            )
            # Items of these groups checked meanwhile are committed after these events:
            # they go to the realms of the members left (see member_realms).
            for env in plan.items:
                group = rules.groups.get(env.recipient)
                if group is None or not env.recipient.endswith(self._suffix):
                    continue
                meta = env.meta or {}
                realms = sorted(realm.realms_of(group.members))
                change = _realm_change(meta.get("event", ""), user, meta, group, realms)
                if change is not None:
                    self._changing[env.recipient] = change
                    changing.append(env.recipient)
                plan.outbox += self._realms_note(env.recipient, meta.get("event", ""), change)
            if account is not None:
                existed = yield realm.store.delete_user(account, user, plan.items, plan.outbox)
                if not existed:
                    return False
            elif plan.items or plan.outbox:
                yield realm.store.append(plan.items, plan.outbox)
            realm.begin_burst()
            try:
                for env in plan.items:
                    before = rules.audience(env)
                    rules.apply(env, mirror=not env.recipient.endswith(self._suffix))
                    realm.route(env, before | rules.audience(env))
                    self.log.info(
                        "group {group}: {event} by {actor}",
                        group=env.recipient,
                        event=(env.meta or {}).get("event"),
                        actor=user,
                    )
                for other in queued_realms(plan.outbox):
                    realm.wake(None, other)
            finally:
                realm.end_burst()
            return True
        finally:
            for addr in changing:
                self._changing.pop(addr, None)
            for addr, lock in reversed(held):
                lock.release()
                if not lock.locked and not lock.waiting:
                    self._locks.pop(addr, None)

    # items ----------------------------------------------------------------------------

    def item_realms(self, sender: str, addr: str) -> list[str]:
        """The realms an item from ``sender`` to group ``addr`` (canonical) is queued
        for, once ``sender`` is checked to be a member (``not_member``).

        Our own group: every other realm with a member, once per realm (not member).
        A group on another realm: its home realm only -- the item is stored here (our
        members see it at once) and the home realm checks membership and forwards it.
        """
        home = addr.rpartition("@")[2]
        if home == self._name:
            self._rules.check_speaker(addr, sender)  # a member; voiced when moderated
            return sorted(self.member_realms(addr))
        mirror = self._rules.groups.get(addr)
        if mirror is None or sender not in mirror.members:
            raise ChatError("not_member", f"you are not a member of {addr}")
        return [home]

    def member_realms(self, addr: str) -> set[str]:
        """The other realms an item of our group ``addr`` committed now goes to: those
        of its members once the change being committed is applied (the item is
        committed after it, in the realm's order: a joiner's realm must have it, a
        realm whose last member is leaving must not, or it refuses it and the sender
        is told of a refusal).  Called just before the item is handed to the store."""
        group = self._rules.groups.get(addr)  # None: deleted since the item's check
        realms = self._realm.realms_of(group.members) if group is not None else set()
        change = self._changing.get(addr)
        if change is None:
            return realms
        realm, joins = change
        return realms | {realm} if joins else realms - {realm}

    def current_realms(self, addr: str) -> set[str]:
        """The other realms with a member of group ``addr`` (canonical) now."""
        group = self._rules.groups.get(addr)
        return self._realm.realms_of(group.members) if group is not None else set()

    def _realms_note(
        self, addr: str, event: str, change: tuple[str, bool] | None
    ) -> list[tuple[str, Any]]:
        """The outbox entries recording how a group event being committed changes the
        other realms of our group ``addr`` (``change``: see :func:`_realm_change`):
        none when it changes none, else those of :meth:`realms_changed`."""
        if not addr.endswith(self._suffix) or (change is None and event != "deleted"):
            return []  # (most events: no member's realms to look at)
        now = self.current_realms(addr)
        if event == "deleted":
            after: set[str] = set()
        else:
            assert change is not None
            realm, joins = change
            after = now | {realm} if joins else now - {realm}
        return self.realms_changed(addr, after) if after != now else []

    def realms_changed(self, addr: str, realms: set[str]) -> list[tuple[str, Any]]:
        """The outbox entries to commit with a group event after which the other
        realms with a member of our group ``addr`` are ``realms``.  None in one
        process: its commit order is the realm's order (see :meth:`member_realms`);
        a worker of a cluster records them (:mod:`chatproto.store.grouprealms`)."""
        return []

    def fanout(self, env: Envelope, realms: Iterable[str], origin: str = "") -> list[Any]:
        """The outbox entries of ``env``, an item of our group, for ``realms`` (those
        with a member as this process knows them, but ``origin``).  In one process,
        one row a realm; a worker of a cluster lets the store choose them at the
        item's position (:mod:`chatproto.store.grouprealms`)."""
        return [(r, env) for r in realms if r != origin]

    def send(
        self, sender: str, to: str, body: str, meta: dict[str, Any] | None = None
    ) -> Deferred[Envelope]:
        """A text message (``meta``: a notice, or None) from local user ``sender`` to
        group ``to``."""
        addr = self.address(to, True, sender)
        realms = self.item_realms(sender, addr)
        env = self._realm.messages.new_envelope(sender, addr, "text", body, meta)
        return self.append(env, realms)

    def append(self, env: Envelope, realms: list[str]) -> Deferred[Envelope]:
        """Commit a group item with its outbox rows for ``realms``, then route it and
        wake their links.

        An item to a group on another realm is signed first: its home realm relays it
        to the other member realms, which believe it on this realm's signature alone
        (chatproto/signing.py)."""
        realm = self._realm
        if realm.signing is not None and not env.recipient.endswith("@" + self._name):
            env.sig = realm.signing.sign(env)
            outbox: list[Any] = [(r, env) for r in realms]
        else:
            outbox = self.fanout(env, realms)
        d = realm.store.append([env], outbox)
        d.addCallback(self.committed, env)
        return d.addCallback(self._wake, outbox)

    def _wake(self, env: Envelope, outbox: list[Any]) -> Envelope:
        for other in queued_realms(outbox):
            self._realm.wake(env, other)
        return env

    def committed(self, _: object, env: Envelope) -> Envelope:
        """A group item was committed: deliver it to the group's members."""
        group = self._rules.groups.get(env.recipient)
        if group is not None:
            self._realm.route(env, group.members)
        return env


def _realm_change(
    event: str, actor: str, meta: dict[str, Any], group: Group | None, realms: list[str]
) -> tuple[str, bool] | None:
    """How a group change changes the realms its items go to (``realms``: those it
    is queued for): ``(realm, True)`` for the join of a user of another realm,
    ``(realm, False)`` for the removal of another realm's last member, else None."""
    if group is None:
        return None
    user = meta.get("user") or actor
    realm = user.rpartition("@")[2]
    if realm not in realms:
        return None
    if event == "joined":
        return realm, True
    if event in ("left", "kicked", "banned") and user in group.members:
        suffix = "@" + realm
        if not any(u != user and u.endswith(suffix) for u in group.members):
            return realm, False
    return None
