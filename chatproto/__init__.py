"""chatproto: a chat realm server, its wire protocol and a client library, built on Twisted.

The public, stable entry points are:

- :mod:`chatproto.realm` -- :class:`chatproto.realm.RealmService`, the state and rules;
- :mod:`chatproto.protocol` -- the client protocol and its factory (bytes <-> realm calls);
- :mod:`chatproto.client` -- a Deferred-based client library;
- :mod:`chatproto.address` -- parsing and normalising ``name@realm`` addresses;
- :mod:`chatproto.config` -- the realm configuration;
- :mod:`chatproto.store` -- the storage interface, its SQLite and in-memory implementations;
- :mod:`chatproto.groups` -- group state and permission rules;
- :mod:`chatproto.errors` -- error codes shared with the wire;
- :mod:`chatproto.extensions` -- the ``realm.plugins`` extension point;
- :mod:`chatproto.testing` -- StringTransport/Clock helpers for testing code built on it;
- :mod:`chatproto.tap` -- ``build()``, the wiring of a realm process.

See docs/embedding-guide.md for what each offers and how stable it is.
"""

__version__ = "0.1.0"
