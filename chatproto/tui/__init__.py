"""``chatproto tui``: a full-screen terminal client built on :mod:`chatproto.client`.

The package is layered so that everything but the drawing can be tested without a
terminal:

- :mod:`chatproto.tui.model`: what is on screen, as plain data (conversations with
  unread counts, message buffers de-duplicated by position and id, day separators,
  presence, transfers, input history);
- :mod:`chatproto.tui.commands`: the ``/command`` parser and tab completion;
- :mod:`chatproto.tui.controller`: drives a :class:`chatproto.client.ChatClientService`
  (reconnect with backoff, lossless resume) and turns stream items, presence frames,
  command results and realm errors into model changes;
- :mod:`chatproto.tui.settings`: the remembered server and user (never the password);
- :mod:`chatproto.tui.view`: urwid widgets that render the model;
- :mod:`chatproto.tui.app`: the entry point, running urwid on the Twisted reactor
  (``urwid.TwistedEventLoop``).
"""
