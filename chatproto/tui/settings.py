"""The terminal client's remembered login: server, user, TLS name and CA, device.

Kept in ``$XDG_CONFIG_HOME/chatproto/tui.toml`` (``~/.config/chatproto/tui.toml`` when
the variable is unset) so the login screen comes up filled in.  The password is never
written anywhere.  The file is small TOML with string values only, written atomically
(a temporary file renamed over the old one) and readable by its owner only.
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

__all__ = ["Settings", "config_path", "load", "save"]

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
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lines = ["# chatproto tui: the remembered login (never the password)"]
    for name in _FIELDS:
        value = getattr(settings, name)
        if value:
            # A JSON string is a TOML basic string, once DEL is escaped too.
            quoted = json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
            lines.append(f"{name} = {quoted}")
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
