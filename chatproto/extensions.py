"""Extensions: code added to a realm without editing chatproto.

An extension is a callable named in the config as ``"module:callable"``
(``[realm] plugins = ["mybot.hooks:setup"]``).  At start-up the realm process imports
it and calls it once with the :class:`chatproto.realm.RealmService`, before anything
is served.  From there it can:

- observe every committed stream item: ``realm.observers.append(fn)``, where
  ``fn(envelope)`` is called after the item is durable and delivered (exceptions are
  logged, never propagated to the sender);
- post messages as a local user: ``realm.post("helpdesk", "#support", "hi")``
  (a Deferred firing with the stored :class:`chatproto.envelope.Envelope`);
- read the realm's state (``realm.groups``, ``realm.who()``) and add Twisted services
  of its own (``service.setServiceParent(realm.parent)`` once the realm is running).

Observers run on the reactor thread: they must not block (use ``deferToThread`` or
the realm's clock for anything slow).  ``chatproto.testing`` tests them without sockets.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from chatproto.config import ConfigError

__all__ = ["load", "load_all"]


def load(spec: str) -> Callable[[Any], Any]:
    """Import ``"module:callable"``; raise :class:`ConfigError` with the reason."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"realm.plugins: {spec!r} is not 'module:callable'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or the module failing at import
        raise ConfigError(f"realm.plugins: cannot import {module_name!r}: {e}") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise ConfigError(f"realm.plugins: {module_name!r} has no {attr!r}")
    if not callable(target):
        raise ConfigError(f"realm.plugins: {spec!r} is not callable")
    return target  # type: ignore[no-any-return]


def load_all(specs: list[str]) -> list[Callable[[Any], Any]]:
    return [load(spec) for spec in specs]
