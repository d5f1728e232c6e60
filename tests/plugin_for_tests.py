"""A realm extension used by tests/test_extensions.py: answers "!ping" in DMs."""

from __future__ import annotations

from typing import Any

seen: list[Any] = []


def setup(realm: Any) -> None:
    def on_item(env: Any) -> None:
        seen.append(env)
        if env.kind == "text" and env.body == "!ping" and env.recipient == "pingbot@localhost":
            realm.post("pingbot", env.sender, "pong")

    realm.observers.append(on_item)


not_callable = 42
