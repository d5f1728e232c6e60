"""A hostile client over real loopback TCP against the newer requests (replies,
reactions, edits, deletes, read markers, typing, search, reports, admin requests),
written from PROTOCOL.md: each bad request ends in a documented error code, with no
traceback in the realm's log and the connection still usable."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from tests.conftest import LogWatch, raw_client

PW = "password-h"


class Asker:
    """Numbered requests on a raw client; :meth:`ask` fires with the reply."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.n = 0

    def ask(self, req: dict[str, Any]) -> Any:
        self.n += 1
        self.client.send({**req, "id": self.n})
        return self.client.reply(self.n)


@pytest.mark.parametrize("server", ["sqlite", "postgresql"], indirect=True)
@pytest_twisted.inlineCallbacks
def test_search_words_of_any_letters_are_plain_terms(server: Any) -> Any:
    """A query is words, never full-text syntax: FTS5 operators, quotes, column
    filters and NEAR find the words only.  A word with a letter SQLite's tokenizer
    reads as a separator (U+19B0, Unicode 8's New Tai Lue) was an FTS5 phrase, which
    the index refuses: internal_error and a traceback; now it is found."""
    realm, _factory, addr = server
    watch = LogWatch()
    try:
        yield realm.create_user("alice", PW)
        alice = Asker((yield raw_client(addr, ("alice", PW))))
        yield alice.ask({"type": "send", "to": "alice", "body": "na\u19b0me and body"})
        yield alice.ask({"type": "send", "to": "alice", "body": "NEAR or not"})
        for query, found in [
            ("na\u19b0me", ["na\u19b0me and body"]),
            ("na\u19b0", ["na\u19b0me and body"]),
            ("NEAR(or not)", ["NEAR or not"]),
            ('"or" OR body*', []),  # three words, all needed
            ("body:and", ["na\u19b0me and body"]),
            ("-body ^and", ["na\u19b0me and body"]),
            ("x" * 256, []),
        ]:
            reply = yield alice.ask({"type": "search", "query": query})
            assert reply["type"] == "result", (query, reply)
            assert [m["body"] for m in reply["messages"]] == found, query
        assert watch.failures == []
    finally:
        watch.close()
