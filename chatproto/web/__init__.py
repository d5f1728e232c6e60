"""The web listener: a browser chat client and the WebSocket gateway it talks to.

``[web] listen`` (or ``twistd chatrealm --web ENDPOINT``) adds a ``twisted.web`` site
(:class:`chatproto.web.site.WebSite`) beside the native listeners.  It serves the page
(``static/``: plain HTML, CSS and ES modules, no build step), a small JSON API for the
browser's session cookie, and ``/ws``, where each WebSocket connection runs the native
protocol (:mod:`chatproto.web.gateway`).  Like every protocol, it only translates: the
realm service holds the state and the rules.
"""

from __future__ import annotations

from chatproto.web.gateway import SESSION_COOKIE
from chatproto.web.site import WebSite

__all__ = ["SESSION_COOKIE", "WebSite"]
