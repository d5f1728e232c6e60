"""The terminal client's remembered login and conversation list.

The login (server, user, TLS name and CA, device) is kept in
``$XDG_CONFIG_HOME/chatproto/tui.toml`` (``~/.config/chatproto/tui.toml`` when the
variable is unset) so the login screen comes up filled in.  The password is never
written anywhere.  The file is small TOML with string values only.

The conversations in the sidebar are state, not configuration: they are kept per
account in ``$XDG_STATE_HOME/chatproto/tui/<user@realm>.json`` (default
``~/.local/state``), because the protocol has no "my conversations" request and a
restarted client should still list the people one talks to.

Files are written atomically (a temporary file renamed over the old one) and are
readable by their owner only.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Any

import attrs

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = [
    "Settings",
    "config_path",
    "download_dir",
    "load",
    "load_conversations",
    "save",
    "save_conversations",
    "state_path",
]

DEFAULT_SERVER = "tcp:127.0.0.1:7420"


@attrs.define
class Settings:
    """What the login screen remembers (all strings; empty means unset)."""

    server: str = DEFAULT_SERVER
    user: str = ""
    #: the name the realm's TLS certificate must carry (default: the host)
    realm: str = ""
    #: a PEM file of the CA to trust for TLS (default: the system's trust store)
    ca: str = ""
    device: str = "tui"
    #: where /download saves files
    downloads: str = ""


_FIELDS = tuple(f.name for f in attrs.fields(Settings))


def config_path(environ: Mapping[str, str] = os.environ) -> str:
    """``$XDG_CONFIG_HOME/chatproto/tui.toml`` (default ``~/.config``)."""
    base = environ.get("XDG_CONFIG_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".config"
    )
    return os.path.join(base, "chatproto", "tui.toml")


def load(path: str) -> Settings:
    """The settings in ``path``; defaults for a missing file or unknown keys.

    Raises ``ValueError`` with a readable message for a file that is not valid TOML.
    """
    try:
        with open(path, "rb") as f:
            data: dict[str, Any] = tomllib.load(f)
    except FileNotFoundError:
        return Settings()
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{path}: not valid TOML: {e}") from None
    values = {k: v for k, v in data.items() if k in _FIELDS and isinstance(v, str)}
    return Settings(**values)


def save(path: str, settings: Settings) -> None:
    """Write ``settings`` to ``path`` (creating the directory), mode 0600."""
    lines = ["# chatproto tui: the remembered login (never the password)"]
    for name in _FIELDS:
        value = getattr(settings, name)
        if value:
            # A JSON string is a TOML basic string, once DEL is escaped too.
            quoted = json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
            lines.append(f"{name} = {quoted}")
    _write(path, "\n".join(lines) + "\n")


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def download_dir(environ: Mapping[str, str] = os.environ) -> str:
    """Where ``/download`` saves: ``$XDG_DOWNLOAD_DIR``, else ``~/Downloads`` if it
    exists, else the current directory."""
    if environ.get("XDG_DOWNLOAD_DIR"):
        return environ["XDG_DOWNLOAD_DIR"]
    home = environ.get("HOME") or os.path.expanduser("~")
    downloads = os.path.join(home, "Downloads")
    return downloads if os.path.isdir(downloads) else os.getcwd()


def state_path(account: str, environ: Mapping[str, str] = os.environ) -> str:
    """``$XDG_STATE_HOME/chatproto/tui/<account>.json`` (default ``~/.local/state``);
    ``account`` is a canonical ``user@realm`` (no ``/`` can occur in one)."""
    base = environ.get("XDG_STATE_HOME") or os.path.join(
        environ.get("HOME") or os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "chatproto", "tui", f"{account.replace('/', '_')}.json")


def load_conversations(path: str) -> list[str]:
    """The remembered conversation addresses; empty for a missing or unreadable file
    (it is only a convenience: the realm has the messages)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return []
    items = data.get("conversations") if isinstance(data, dict) else None
    return [a for a in items if isinstance(a, str) and a] if isinstance(items, list) else []


def save_conversations(path: str, addresses: list[str]) -> None:
    _write(path, json.dumps({"conversations": sorted(addresses)}, indent=1) + "\n")
