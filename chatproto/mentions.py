"""The mention rule: which member an ``@name`` in a group message is for.

One rule, used by the realm (the ``mentions`` count of a group in the conversation
list, computed in the store) and mirrored by the clients that highlight mentions (the
TUI, and the web page's script): a body *mentions* a user when it contains ``@``
followed by the user's name (the local part of their address), in any case, where

- the ``@`` does not follow a letter, a digit or one of ``. _ - @`` (so an address
  such as ``bob@alice`` or a handle ``x@alice`` mentions nobody), and
- the name is not followed by a letter, a digit, ``_`` or ``-``, nor by ``.`` and one
  of those (so ``@alice.`` at the end of a sentence mentions ``alice``, but
  ``@alice.b`` does not: that is another name).

Letters and digits are Unicode's (``\\w``), not only ASCII's: names are ASCII, so
``@anaïs`` is another word than ``@ana`` and mentions nobody named ``ana`` (it did,
when the rule knew only ``A-Z``), and ``café@ana`` is no mention either.

``@alice@example.org`` mentions ``alice`` (of any realm: the realm part is not looked
at).
"""

from __future__ import annotations

import functools
import re

__all__ = ["mention_pattern", "mentions"]


def mention_pattern(name: str) -> str:
    """The regular expression (Python and PostgreSQL syntax alike: lookarounds, no
    flags; ``\\w`` is a letter, a digit or ``_`` in both) that finds a mention of
    ``name`` in a body, to be matched case-insensitively."""
    return rf"(?<![\w.@-])@{re.escape(name)}(?![\w-])(?!\.[\w-])"


@functools.lru_cache(maxsize=1024)
def _compiled(name: str) -> re.Pattern[str]:
    return re.compile(mention_pattern(name), re.IGNORECASE)


def mentions(body: str | None, name: str) -> bool:
    """Whether ``body`` mentions the user whose name (local part) is ``name``."""
    if not body or "@" not in body:
        return False
    return _compiled(name).search(body) is not None
