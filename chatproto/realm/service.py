"""The realm service: the facade protocols call, and the wiring of its handlers.

:class:`RealmService` owns the store, the services' lifecycle and one handler per
concern: accounts (:mod:`chatproto.realm.accounts`), sessions and delivery
(:mod:`chatproto.realm.sessions`), presence (:mod:`chatproto.realm.presence`),
messaging (:mod:`chatproto.realm.messaging`), group changes
(:mod:`chatproto.realm.groups`), files (:mod:`chatproto.files`), replies, reactions,
edits and deletes (:mod:`chatproto.realm.relations`) and what other realms send
(:mod:`chatproto.realm.remote`).  Protocols (the native client protocol, the
gateways and federation) never hold chat state: they call this facade and a
``Session`` (the cred avatar) and are called back through ``ISessionMind`` (the cred
*mind*), in the shape of ``twisted.words.service``.  Handlers reach each other through
the facade's public attributes; the facade is the seam where a cluster would swap a
handler's local state for a shared one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from chatproto.address import Address
from chatproto.admission import Admission
from chatproto.config import Config
from chatproto.envelope import Envelope
from chatproto.errors import ChatError
from chatproto.files import FileService
from chatproto.groups import Groups
from chatproto.ops.stats import RealmStats
from chatproto.realm.accounts import Accounts, PasswordHasher
from chatproto.realm.admin import Admin
from chatproto.realm.groups import GroupHandler
from chatproto.realm.guests import Guests
from chatproto.realm.messaging import Messaging
from chatproto.realm.moderation import Moderation
from chatproto.realm.presence import Presence
from chatproto.realm.reading import Reading
from chatproto.realm.relations import Relations
from chatproto.realm.remote import RemoteIntake
from chatproto.realm.sessions import Session, Sessions
from chatproto.realm.tags import ClientTags
from chatproto.signing import KEY_FILE, KeyFileError, KeyRing, SigningKeys
from chatproto.store import IStore

__all__ = ["RealmService"]

_T = TypeVar("_T")


class RealmService(Service):
    """A realm: accounts, sessions, routing and rules, over an :class:`IStore`.

    ``clock`` provides time for every rule (rate limits, throttles, timestamps).
    """

    name = "realm"
    log = Logger()

    def __init__(
        self,
        config: Config,
        store: IStore,
        reactor: Any,
        clock: IReactorTime | None = None,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.config = config
        self.realm = config.realm
        #: set when startService has loaded the realm's state (see when_started)
        self._started = False
        self._start_waiters: list[Deferred[None]] = []
        #: The start in progress (None before startService and once it has finished).
        self._starting: Deferred[None] | None = None
        self._suffix = "@" + config.realm
        self.store = store
        #: The rule is the realm's; the store keeps it in the transaction of each ack.
        store.max_devices = config.limits.max_devices_per_user
        self.reactor = reactor
        self.clock: IReactorTime = clock if clock is not None else reactor
        #: Running counters (logins, deliveries...): what the metrics report.
        self.stats = RealmStats()
        #: Accounts, logins and session tokens (see chatproto.realm.accounts).
        self.accounts = Accounts(self, hasher)
        self.hasher = self.accounts.hasher
        self.tokens = self.accounts.tokens
        self.portal = self.accounts.portal
        self._parsed: dict[tuple[Any, str, bool], Address] = {}
        self._opening: Deferred[None] | None = None
        lim = config.limits
        self.groups = Groups(lim.max_members_per_group, lim.max_groups_per_user, config.realm)
        #: The online sessions and delivery to them (see chatproto.realm.sessions).
        self.sessions = Sessions(lim, self._wake_links, self.stats)
        #: Who is online and who hears of it (see chatproto.realm.presence).
        self.presence = Presence(
            config.realm,
            self.sessions,
            self.groups,
            store,
            lambda: self.federation,
            self.realms_of,
        )
        #: Client connections not logged in yet, shared by every client listener
        #: (native, TLS, WebSocket, IRC): see chatproto.admission.
        self.unauthenticated = Admission(
            "clients", lim.max_unauthenticated, lim.max_unauthenticated_per_address, self.clock
        )
        self._prune = LoopingCall(self._prune_throttles)
        self._prune.clock = self.clock
        #: realm -> items committed for it during the current burst (one wake each).
        self._wakes: dict[str, int] = {}
        if hasattr(store, "burst_listener"):
            store.burst_listener = self
        #: Hooks called with every committed envelope (extension point; see docs).
        self.observers: list[Callable[[Envelope], None]] = []
        #: The :class:`chatproto.federation.FederationService` when federation is on:
        #: told (``wake``) after items for another realm are committed to the outbox.
        self.federation: Any = None
        #: Files: offers, uploads, downloads and their rules (see chatproto/files.py).
        self.files = FileService(self, config.files_path)
        #: This realm's signing keys (federation only; loaded at start, see
        #: chatproto/signing.py) and the keys peer realms announced to it.
        self.signing: SigningKeys | None = None
        self.peer_keys = KeyRing(store, self.clock)
        #: Group changes and group items (the rules are ``groups``).
        self.group_handler = GroupHandler(self)
        #: What peer realms send, checked (see chatproto.realm.remote).
        self.remote = RemoteIntake(self)
        #: Sending, committing and reading stream items.
        self.messages = Messaging(self, self.accounts.known)
        #: Replies, reactions, edits and deletes (see chatproto.realm.relations).
        self.relations = Relations(self)
        #: Temporary accounts for IRC clients without one (``[irc] guests``).
        self.guests = Guests(self)
        #: Client tags sent on their own (IRC's TAGMSG): see chatproto.realm.tags.
        self.client_tags = ClientTags(self)
        #: What operators do to the running realm (chatrealmctl, the control channel).
        self.admin = Admin(self)
        #: The cluster side of a worker process (chatproto.cluster.worker.Worker), or
        #: None in a single-process realm.  It replaces delivery (route), presence and
        #: messaging with their cluster versions.
        self.cluster: Any = None
        #: Read markers, the conversation list and typing notices.
        self.reading = Reading(self)
        #: Realm admins and abuse reports (see chatproto.realm.moderation).
        self.moderation = Moderation(self)

    # service lifecycle --------------------------------------------------------------

    def privilegedStartService(self) -> None:
        """Open the store before the reactor runs (under twistd).

        A store that cannot be opened (unreadable file, schema from a newer chatproto)
        stops start-up with a readable message and a non-zero exit, rather than a
        realm that listens but cannot serve.
        """
        Service.privilegedStartService(self)
        if self.cluster is not None:
            self.cluster.check_services()
        self._open_store()
        self._load_keys()

    def _load_keys(self) -> None:
        """With federation on: this realm's signing keys, made on first start in the
        data directory.  A key file that cannot be used stops start-up."""
        if self.signing is not None or not self.config.federation.enabled:
            return
        path = os.path.join(self.config.data_dir, KEY_FILE)
        try:
            self.signing = SigningKeys.load(path, self.clock.seconds())
        except (KeyFileError, OSError) as e:
            raise SystemExit(f"chatrealm: federation signing keys: {e}") from None
        self.log.info("federation: signing key {id} ({path})", id=self.signing.id, path=path)

    def _open_store(self) -> Deferred[None]:
        if self._opening is None:
            self._opening = self.store.open()
            failures: list[Any] = []
            self._opening.addErrback(failures.append)
            if failures:
                raise SystemExit(f"chatrealm: cannot open the store: {failures[0].value}")
        return self._opening

    def startService(self) -> Deferred[None]:
        Service.startService(self)
        starting = self._starting = self._start()

        def finished(result: Any) -> Any:
            self._starting = None
            return result

        return starting.addBoth(finished)

    @inlineCallbacks
    def _start(self) -> Any:
        self.accounts.start()
        yield self._open_store()
        self._load_keys()
        if self.config.federation.enabled:
            yield self.peer_keys.load()
        yield self.accounts.load()
        yield self.admin.load()
        yield self.reading.load()
        yield self.moderation.load()
        after = 0
        while True:  # groups are the replay of their committed events
            events = yield self.store.read_events(after, 1000)
            for env in events:
                self.groups.apply(env, mirror=not env.recipient.endswith(self._suffix))
            if len(events) < 1000:
                break
            after = events[-1].pos
        yield self.accounts.repair_standing()
        yield self.guests.remove_left_over()
        yield self.files.start()
        self._prune.start(self.config.auth.failure_window / 4, now=False)
        if self.cluster is not None:
            self.cluster.realm_started()
        self._started = True
        waiters, self._start_waiters = self._start_waiters, []
        for d in waiters:
            d.callback(None)
        self.log.info(
            "realm {realm} started: {users} users, {groups} groups, store {path}",
            realm=self.realm,
            users=len(self.accounts.known),
            groups=len(self.groups.groups),
            path=getattr(self.store, "path", "?"),
        )

    def when_started(self) -> Deferred[None]:
        """Fires once the realm has read what it needs from its store at start
        (accounts, suspensions, admins, browser logins, groups): logins wait for it, so
        none is checked against a state not yet loaded (a suspended account, say)."""
        if self._started:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._start_waiters.append(d)
        return d

    @inlineCallbacks
    def stopService(self) -> Any:
        Service.stopService(self)
        if self._starting is not None:
            # Stopped while starting: let the start finish its reads (they would fail on
            # a closed store), then stop all it started.  Its result, failure or not,
            # stays the starter's.
            settled: Deferred[None] = Deferred()

            def passed(result: Any) -> Any:
                settled.callback(None)
                return result

            self._starting.addBoth(passed)
            yield settled
        if self._prune.running:
            self._prune.stop()
        if self.cluster is not None:
            yield self.cluster.realm_stopping()
        for s in self.sessions.all():
            # One connection that fails to close must not keep the store open.
            try:
                s.mind.disconnect("shutting_down", "the realm is stopping")
            except Exception:
                self.log.failure("closing {user} at shutdown failed", user=s.user_id)
            s.logout()
        yield self.files.stop()
        yield self.store.close()
        self.accounts.stop()
        self.log.info("realm {realm} stopped", realm=self.realm)

    def _prune_throttles(self) -> None:
        self.accounts.prune()
        self.moderation.prune()

    def create_user(self, name: str, password: str) -> Deferred[Address]:
        """Create a local account (used by in-band register and embedding apps)."""
        return self.accounts.create_user(name, password)  # type: ignore[no-any-return]

    def delete_user(self, name: str) -> Deferred[bool]:
        """Delete a local account (see PROTOCOL.md, "What deleting an account
        removes"); fires with True if it existed."""
        return self.accounts.delete_user(name)  # type: ignore[no-any-return]

    def account_floor(self, user: str) -> Deferred[int | None]:
        """The floor of the local account at canonical address ``user``, or None."""
        return self.accounts.account_floor(user)

    def register(self, name: str, password: str, peer: str = "?") -> Deferred[Address]:
        """In-band registration from client address ``peer`` (see
        :meth:`Accounts.register`)."""
        return self.accounts.register(name, password, peer)

    def login(
        self,
        username: str,
        password: str,
        mind: Any,
        device: str = "default",
        peer: str = "?",
        quiet: bool = False,
    ) -> Deferred[Session]:
        """Authenticate and attach ``mind``; fires with a :class:`Session` (see
        :meth:`chatproto.realm.accounts.Accounts.login`)."""
        return self.accounts.login(username, password, mind, device, peer, quiet)  # type: ignore[no-any-return]

    def login_guest(self, nick: str, mind: Any, device: str, peer: str) -> Deferred[Session]:
        """A temporary account for a client without one, shown as ``nick`` (only
        with ``[irc] guests``; see chatproto.realm.guests)."""
        return self.guests.login(nick, mind, device, peer)

    def login_token(
        self,
        token: str | None,
        mind: Any,
        device: str | None = None,
        peer: str = "?",
        quiet: bool = False,
    ) -> Deferred[Session]:
        """:meth:`login` with a browser's session token instead of a password."""
        return self.accounts.login_token(token, mind, device, peer, quiet)  # type: ignore[no-any-return]

    def issue_token(
        self, username: str, password: str, device: str = "web", peer: str = "?"
    ) -> Deferred[tuple[str, Address]]:
        """Check a password and issue a session token for ``device``."""
        return self.accounts.issue_token(username, password, device, peer)  # type: ignore[no-any-return]

    def token_user(self, token: str | None) -> Address | None:
        """The local user a live session token stands for (marking it used), or None."""
        return self.accounts.token_user(token)

    def revoke_token(self, token: str | None) -> None:
        """Log a browser out: the token stops working."""
        self.accounts.revoke_token(token)

    def standing_changed(
        self, name: str, reload: Sequence[str], end: tuple[str, str] | None = None
    ) -> None:
        """Local account ``name``'s standing was changed here, in the store and in this
        process's memory: a suspension, the admin role, browser logins, the account
        itself (:data:`chatproto.realm.admin.STANDING`), or its sessions ended (``end``:
        the error code and reason they were told).  A worker of a cluster tells the
        other workers, which re-read ``reload`` from the store and end the sessions
        they hold (:meth:`chatproto.realm.admin.Admin.follow`); nothing to do in one
        process."""
        if self.cluster is not None:
            self.cluster.standing_changed(name, reload, end)

    def attach(self, name: str, mind: Any) -> Session:
        """A new session of local account ``name`` (the cred realm's avatar)."""
        session = self.sessions.attach(Session(self, Address(name, self.realm), "default", mind))
        self.accounts.known.add(name)
        return session

    def detach(self, session: Session) -> None:
        """A session ended (:meth:`Session.logout`): it gets nothing more."""
        self.presence.went_offline(session, self.sessions.detach(session))
        if self.guests.accounts:
            self.guests.ended(session)

    def sessions_of(self, user: str) -> Sequence[Session]:
        return self.sessions.of(user)

    def online_count(self) -> int:
        """How many users are online (have a non-quiet session)."""
        return self.presence.online_count()

    def presence_of(self, user: str) -> tuple[str, str]:
        """(status, text) of canonical user address ``user``: ``offline`` when no
        non-quiet session is open, else ``online``/``away``/``busy`` (for gateways)."""
        return self.presence.of(user)

    def is_user(self, user: str) -> bool:
        """Whether canonical address ``user`` is a known local account."""
        return self.accounts.is_user(user)

    def who(
        self, session: Session | None = None, group: str | None = None, user: str | None = None
    ) -> Any:
        """Online users of the realm, or online members of ``group`` (members only;
        members on other realms as their realm last told us, without ``sessions``).

        With ``user``: that user alone (an empty list when offline), so a client can
        show the presence of someone it is about to write to; a Deferred, failing with
        ``no_such_user`` when no such local account exists (a user of another realm,
        with federation, is as this realm last heard; ``remote_realm`` without it)."""
        if user is not None:
            if group is not None:
                raise ChatError("bad_request", "give 'group' or 'user', not both")
            by = session.user_id if session is not None else None
            resolved = self.messages.resolve_user(user, remote_ok=True, by=by)
            d = resolved if isinstance(resolved, Deferred) else succeed(resolved)
            return d.addCallback(lambda addr: self.presence.who([str(addr)]))
        if group is None:
            return self.presence.who()
        user = session.user_id if session else ""
        return self.presence.who(self.group_handler.readable(user, group).members)

    def presence_for(self, realm: str) -> list[dict[str, Any]]:
        """Presence frames a link to ``realm`` sends when it becomes ready."""
        return self.presence.for_realm(realm)

    def presence_wanted(self, realm: str) -> bool:
        """Whether an online local user has a contact on ``realm`` (a link to it
        stays up for their presence)."""
        return self.presence.wanted_by(realm)

    def presence_snapshot(self, session: Session) -> None:
        """Tell a session that has just synced which of its contacts are online."""
        self.presence.snapshot(session)

    def set_status(self, session: Session, status: str, text: str = "") -> None:
        self.presence.set_status(session, status, text)

    def group_event(self, session: Session, event: str, group: str, **args: Any) -> Any:
        """Check, commit, apply and route one group change; fires with its envelope."""
        return self.group_handler.change_by(session, event, group, args)

    def list_groups(self) -> list[dict[str, Any]]:
        """The public groups of this realm (not the mirrors of other realms' groups)."""
        return self.group_handler.list_public()

    def members(self, session: Session, group: str) -> list[dict[str, Any]]:
        return self.group_handler.members(session.user_id, group)

    def group_info(self, session: Session, group: str) -> dict[str, Any]:
        return self.group_handler.info(session.user_id, group)

    def send_private(
        self,
        session: Session,
        to: str,
        body: str,
        nonce: str | None = None,
        notice: bool = False,
        reply_to: str | None = None,
        tags: dict[str, str] | None = None,
    ) -> Deferred[Envelope]:
        """Store a message (to a user or a group), then route it; fires with the
        committed envelope (see :meth:`chatproto.realm.messaging.Messaging.send`)."""
        return self.messages.send(session, to, body, nonce, notice, reply_to, tags)

    def send_tags(self, session: Session, to: str, tags: Any) -> Deferred[dict[str, Any]]:
        """Client tags on their own, not stored (see chatproto.realm.tags); fires with
        the ``tags`` notice's data."""
        return self.client_tags.send(session, to, tags)

    def post(self, sender: str, to: str, body: str) -> Deferred[Envelope]:
        """Send ``body`` to ``to`` (a user or ``#group``) as local user ``sender``.

        For extensions running inside the realm (bots, bridges, hooks; see
        ``realm.plugins`` in the config): the same rules as a client's ``send`` except
        the rate limit, durable before the Deferred fires.
        """
        return self.messages.post(sender, to, body)

    def group_event_as(self, sender: str, event: str, group: str, **args: Any) -> Any:
        """:meth:`group_event` on behalf of local user ``sender`` (for extensions: a bot
        joining or creating its group).  Same permission rules as for a client."""
        try:
            addr = self.messages.resolve_user(sender)
        except ChatError as e:
            return fail(e)
        change = self.group_handler.change
        if isinstance(addr, Deferred):
            return addr.addCallback(lambda a: change(str(a), event, group, args))
        return change(str(addr), event, group, args)

    def wake(self, env: _T, realm: str) -> _T:
        """Items for ``realm`` were committed: wake its link -- once per group commit
        (at the end of the delivery burst, after every item of the commit has been
        applied and routed), not once per item.  Returns ``env`` (a callback)."""
        if self.federation is not None:
            if self.sessions.bursting:
                self._wakes[realm] = self._wakes.get(realm, 0) + 1
            else:
                self.federation.wake(realm)
        return env

    # federation -----------------------------------------------------------------------

    def check_remote(self, realm: str, by: str | None = None) -> None:
        """Raise unless items may go to ``realm`` (federation on, realm allowed, and
        a link to it kept or one more within ``[federation] max_peers`` -- and, for a
        realm never reached, within ``max_peers_per_user`` of those for ``by``, the
        user whose request names it: see ``FederationService.admit``)."""
        fed = self.config.federation
        if not fed.enabled or self.federation is None:
            raise ChatError("remote_realm", f"{realm} is another realm; federation is off")
        if not fed.allows(realm):
            raise ChatError("peer_denied", f"this realm does not federate with {realm}")
        if not self.federation.admit(realm, by):
            raise ChatError("peer_denied", self.federation.refusal(realm, by))

    def realms_of(self, users: Any) -> set[str]:
        """The other realms among ``users`` that this realm federates with."""
        if self.federation is None:
            return set()
        fed = self.config.federation
        realms = {u.rpartition("@")[2] for u in users} - {self.realm}
        return {r for r in realms if fed.allows(r)}

    # federation (see chatproto.realm.remote) ----------------------------------------

    def receive_remote(
        self, origin: str, items: Sequence[Any], fetch: Any = None, queued: Any = None
    ) -> Deferred[list[dict[str, Any]]]:
        """Store the items of one transaction from peer realm ``origin``; fires with
        the rejected ones (see :meth:`chatproto.realm.remote.RemoteIntake.receive_remote`)."""
        return self.remote.receive_remote(origin, items, fetch, queued)  # type: ignore[no-any-return]

    def bounce(self, peer: str, rejected: Sequence[tuple[Any, str, str]]) -> Deferred[None]:
        """Tell local senders that peer realm ``peer`` refused their items."""
        return self.remote.bounce(peer, rejected)

    def forward_group_change(
        self, actor: str, event: str, addr: str, args: dict[str, Any]
    ) -> Deferred[Envelope]:
        """A local user's change to a group on another realm: a request to its home."""
        return self.remote.forward_group_change(actor, event, addr, args)

    def remote_presence(self, origin: str, user: Any, status: Any, text: Any) -> None:
        """A presence change of a user of peer realm ``origin`` (see
        :meth:`chatproto.realm.presence.Presence.remote_change`)."""
        self.presence.remote_change(origin, user, status, text)

    def remote_realm_silent(self, origin: str) -> None:
        """Peer realm ``origin`` has been unreachable a while: its users go offline here."""
        self.presence.realm_silent(origin)

    def commit_item(self, env: Envelope) -> Deferred[Envelope]:
        """Store an item the realm's rules have already allowed (a file message, say),
        then route it like a message; fires with it once committed (see
        :meth:`chatproto.realm.messaging.Messaging.commit_item`)."""
        return self.messages.commit_item(env)

    def history(
        self,
        session: Session,
        peer: str,
        before: int | None,
        after: int | None,
        limit: int | None,
    ) -> Deferred[list[Envelope]]:
        """A page of the history of a conversation ``session``'s user may read."""
        return self.messages.history(session, peer, before, after, limit)

    @property
    def bursting(self) -> bool:
        """True while committed items are being handed out (see :meth:`begin_burst`)."""
        # (Sessions.bursting's test, without its property call: every delivery asks)
        return self.sessions.burst_depth > 0

    def begin_burst(self) -> None:
        """Items delivered until the matching :meth:`end_burst` may be held by each
        connection and written at once (one write per connection per group commit
        instead of one per item).  Nests."""
        self.sessions.burst_depth += 1  # (Sessions.begin_burst, without its call)

    def hold(self, mind: Any) -> None:
        """``mind`` holds frames until the burst ends (it calls this once per burst)."""
        self.sessions.held.append(mind)  # (Sessions.hold, without its call)

    def end_burst(self) -> None:
        self.sessions.end_burst()

    def _wake_links(self) -> None:
        """The outermost delivery burst ended: wake the links of the realms items
        were committed for during it, once each."""
        if self._wakes:
            wakes, self._wakes = self._wakes, {}
            for realm, n in wakes.items():
                try:
                    if self.federation is not None:
                        self.federation.wake(realm, n)
                except Exception:  # the other links must still be woken
                    self.log.failure("waking the link to {realm} failed", realm=realm)

    def route_private(self, items: list[Envelope]) -> None:
        """Deliver committed private items (a run of one send batch, in position
        order) as :meth:`route` does each, in one call when nothing else needs to see
        them one by one (a cluster's stream, message observers)."""
        if self.cluster is None and not self.observers:
            self.sessions.route_private(items)
            return
        for env in items:
            self.route(env)

    def until_routed(self, pos: int) -> Deferred[None] | None:
        """None once every item up to ``pos`` has been handed to this process's
        sessions, else a Deferred firing when it has (or when the stream fails).

        In one process an item is routed in its commit's callback, so always None.
        A worker of a cluster routes its own commits too from the store, in position
        order, a round trip later (chatproto.cluster.stream): a gateway whose reply
        is carried by the item (IRC's JOIN, an echo) waits for it."""
        if self.cluster is None:
            return None
        return self.cluster.until_routed(pos)  # type: ignore[no-any-return]

    def route(self, env: Envelope, users: Any = None) -> None:
        """Deliver a committed item to every online session of its audience: ``users``
        (a group's members), or for a private message its recipient and its sender.

        The sending session gets it too: each session's stream is then the one ordered
        record of its conversations, which is what acks and resume are defined on.
        """
        if users is None:
            users = (env.recipient,) if env.sender == env.recipient else (env.recipient, env.sender)
        if self.cluster is None:
            self.sessions.route(env, users)
        else:  # a worker: delivered from the store, in position order with the others'
            self.cluster.committed(env, users)
        for observer in self.observers:
            try:
                observer(env)
            except Exception:
                self.log.failure("message observer {o!r} failed", o=observer)
