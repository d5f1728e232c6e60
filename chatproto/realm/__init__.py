"""The realm: the only place with chat state and rules.

Protocols and gateways (native, web, IRC, federation) call :class:`RealmService`, the
facade, and the logged-in :class:`Session` (the twisted.cred avatar); the realm calls
them back through :class:`ISessionMind`.  The facade wires handler modules, one per
concern, in the shape of Synapse's handlers:

- :mod:`chatproto.realm.service` -- :class:`RealmService`, the facade and its wiring.

Everything the embedding guide documents is importable from ``chatproto.realm``.
"""

from chatproto.realm.service import (
    MAX_DEVICE,
    MAX_STATUS_TEXT,
    NONCES_PER_USER,
    PRESENCE_STATES,
    SYNC_BUFFER,
    SYNC_PAGE,
    ISession,
    ISessionMind,
    Notice,
    PasswordHasher,
    RealmService,
    Session,
    StoreChecker,
    argon2_hasher,
    check_password,
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
