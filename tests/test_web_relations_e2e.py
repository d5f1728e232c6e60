"""Replies, reactions, edits and deletes in the web page (issue 17): two headless
Chromium sessions on a real web listener (``tests/e2e/web_relations.mjs``; the tools
as in tests/test_web_e2e.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted

from tests.test_web_e2e import PASSWORD, ROOT, run_on_realm, tools  # noqa: F401

SCRIPT = ROOT / "tests" / "e2e" / "web_relations.mjs"


@pytest_twisted.inlineCallbacks
def test_reply_react_edit_delete_in_two_browsers(
    realm: Any,
    tools: Any,  # noqa: F811
    tmp_path: Path,
) -> Any:
    for name in ("alice", "bob"):
        yield realm.create_user(name, PASSWORD)
    yield run_on_realm(realm, tools, SCRIPT, tmp_path, "e2e relations finished")
