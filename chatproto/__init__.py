"""chatproto: a chat realm server, its wire protocol and a client library, built on Twisted.

The public, stable entry points are:

- :mod:`chatproto.realm` -- :class:`chatproto.realm.RealmService`, the state and rules;
- :mod:`chatproto.protocol` -- the client protocol and its factory (bytes <-> realm calls);
- :mod:`chatproto.client` -- a Deferred-based client library;
- :mod:`chatproto.address` -- parsing and normalising ``name@realm`` addresses;
- :mod:`chatproto.config` -- the realm configuration;
- :mod:`chatproto.store` -- the storage interface and its SQLite implementation.
"""

__version__ = "0.1.0"
