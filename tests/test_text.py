"""chatproto.text: what a client-chosen string shown to others may contain."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from chatproto.errors import ChatError
from chatproto.irc.lines import plain_text
from chatproto.text import check_body, check_label, label_problem, log_shown, without_forbidden

#: Every character a label refuses (PROTOCOL.md, "Text shown to others").
FORBIDDEN = (
    {chr(c) for c in range(0x20)}
    | {chr(c) for c in range(0x7F, 0xA0)}
    | {"\u2028", "\u2029"}
    | {chr(c) for c in range(0x202A, 0x202F)}
    | {chr(c) for c in range(0x2066, 0x206A)}
)


@given(st.text(max_size=30))
def test_a_label_is_refused_exactly_when_it_holds_a_forbidden_character(text: str) -> None:
    bad = any(c in FORBIDDEN for c in text)
    assert (label_problem(text) is not None) == bad
    if bad:
        with pytest.raises(ChatError) as e:
            check_label(text, "the thing")
        assert e.value.code == "bad_request" and e.value.message.startswith("the thing ")
    else:
        assert check_label(text, "the thing") == text


@given(st.text(max_size=30))
def test_without_forbidden_drops_exactly_what_a_label_refuses(text: str) -> None:
    cleaned = without_forbidden(text)
    assert cleaned == "".join(c for c in text if c not in FORBIDDEN)
    assert label_problem(cleaned) is None


@pytest.mark.parametrize("char", sorted(FORBIDDEN))
def test_every_forbidden_character_is_named(char: str) -> None:
    with pytest.raises(ChatError) as e:
        check_label(f"a{char}b", "a file name")
    assert f"U+{ord(char):04X}" in e.value.message


@pytest.mark.parametrize(
    "text",
    ["👩\u200d💻", "\u200fשלום\u200e", "عربى\u061c", "日本語", "naïve", "\u00a0nbsp", "a\u00adb"],  # noqa: RUF001
)
def test_labels_keep_marks_joiners_and_every_script(text: str) -> None:
    assert check_label(text, "x") == text


@given(st.text(max_size=30))
def test_a_body_is_refused_exactly_for_escape_and_c1(text: str) -> None:
    bad = any(c == "\x1b" or 0x80 <= ord(c) <= 0x9F for c in text)
    if bad:
        with pytest.raises(ChatError):
            check_body(text)
    else:
        assert check_body(text) == text


@pytest.mark.parametrize("text", ["\x1b[2J", "ok\x1b", "\x1b", "é\x1b", "a\x85b"])
def test_escape_is_refused_in_ascii_and_other_bodies_alike(text: str) -> None:
    """ASCII bodies take a shorter check (an ESC search); the answer is the same."""
    with pytest.raises(ChatError) as e:
        check_body(text)
    code = "U+0085" if "\x85" in text else "U+001B"
    assert e.value.message == f"body contains {code} (escape or C1 control: not text)"
    assert check_body("plain\ttext\x02bold\x02\x01ACTION\x01") is not None


def test_irc_formatting_is_dropped_from_plain_text() -> None:
    assert plain_text("\x02bold\x02 \x0304,12red\x03 \x04ff0000hex\x0f \x1ditalic\x1d") == (
        "bold red hex italic"
    )
    assert plain_text("\x1funder\x1f\x16rev\x11mono\x1estrike") == "underrevmonostrike"
    assert plain_text("\x03") == "" and plain_text("100%") == "100%"


def test_log_shown_cuts_and_spells_what_is_not_printable() -> None:
    assert log_shown("m-1") == "m-1"
    assert log_shown(None) == "None"
    assert log_shown("x" * 100) == "x" * 64
    assert log_shown("abc", 2) == "ab"
    # CR/LF, escapes: spelled out, not written into the log
    assert log_shown("a\r\nforged line") == repr("a\r\nforged line")
    assert "\n" not in log_shown("a\n\x1b[2J") and "\x1b" not in log_shown("a\n\x1b[2J")
