"""The realm: the only place with chat state and rules.

Protocols and gateways (native, web, IRC, federation) call :class:`RealmService`, the
facade, and the logged-in :class:`Session` (the twisted.cred avatar); the realm calls
them back through :class:`ISessionMind`.  The facade wires handler modules, one per
concern, in the shape of Synapse's handlers:

- :mod:`chatproto.realm.service` -- :class:`RealmService`, the facade and its wiring;
- :mod:`chatproto.realm.accounts` -- accounts, logins, session tokens;
- :mod:`chatproto.realm.sessions` -- sessions (the avatar) and delivery to them;
- :mod:`chatproto.realm.presence` -- who is online and who hears of it;
- :mod:`chatproto.realm.messaging` -- sending, committing and reading stream items;
- :mod:`chatproto.realm.groups` -- the commit path of group changes and items;
- :mod:`chatproto.realm.remote` -- what other realms send, checked before it is stored;
- :mod:`chatproto.realm.admin` -- what operators do to the running realm (kick, set a
  password, list sessions; the control channel's handler).

Everything the embedding guide documents is importable from ``chatproto.realm``.
"""

from chatproto.realm.accounts import PasswordHasher, StoreChecker, argon2_hasher, check_password
from chatproto.realm.messaging import NONCES_PER_USER
from chatproto.realm.presence import MAX_STATUS_TEXT, PRESENCE_STATES
from chatproto.realm.service import RealmService
from chatproto.realm.sessions import (
    MAX_DEVICE,
    SYNC_BUFFER,
    SYNC_PAGE,
    ISession,
    ISessionMind,
    Notice,
    Session,
)

__all__ = [
    "MAX_DEVICE",
    "MAX_STATUS_TEXT",
    "NONCES_PER_USER",
    "PRESENCE_STATES",
    "SYNC_BUFFER",
    "SYNC_PAGE",
    "ISession",
    "ISessionMind",
    "Notice",
    "PasswordHasher",
    "RealmService",
    "Session",
    "StoreChecker",
    "argon2_hasher",
    "check_password",
]
