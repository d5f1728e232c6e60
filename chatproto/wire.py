"""Wire format v1: how frames are told apart, decoded, validated and encoded.

Framing is ``twisted.protocols.basic.Int32StringReceiver`` (a 4-byte big-endian
length, then the payload).  The first payload byte is the *frame kind*:

- ``{`` (0x7B): a control frame, a UTF-8 JSON object with a ``type``;
- 0x00: a binary data frame carrying file bytes (see :func:`encode_data`): a 14-byte
  header ``00 | op | stream (u32) | offset (u64)`` (big-endian), then the data.

This module has no state and no I/O: it only converts between bytes and dicts, so the
client protocol, the client library and tests share one definition.

**Strict JSON.**  Every JSON text that comes from a client or a peer is read by
:func:`parse_json` (through :func:`decode` for frames): RFC 8259 only, so ``NaN``,
``Infinity`` and ``-Infinity`` (which Python's ``json`` accepts), an object with the
same name twice (which implementations read differently: the first or the last), and
an integer of more than 4300 digits (which Python refuses with a ``ValueError``) are
``bad_frame``; a string with a lone surrogate is ``bad_request``.  A number too large
for a double (``1e400``) is valid JSON and reads as infinity, which no field accepts
(:func:`field`).
"""

from __future__ import annotations

import json
import re
import struct
from math import isfinite
from typing import Any

from chatproto.errors import ChatError, FatalProtocolError

__all__ = [
    "COMPACT_SEND",
    "DATA_HEADER",
    "OP_DOWNLOAD",
    "OP_UPLOAD",
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "compact_send",
    "compact_send_fields",
    "decode",
    "decode_data",
    "encode",
    "encode_data",
    "error_frame",
    "field",
    "integer",
    "parse_json",
    "result_frame",
]

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)
FRAME_JSON = 0x7B
FRAME_BINARY = 0x00

#: Binary data frame header: kind byte 0x00, op, stream number, absolute file offset.
DATA_HEADER = struct.Struct("!BBIQ")
#: Op of a data frame from client to realm: bytes of an upload.
OP_UPLOAD = 0x01
#: Op of a data frame from realm to client: bytes of a download.
OP_DOWNLOAD = 0x02
_DATA_OPS = (OP_UPLOAD, OP_DOWNLOAD)

#: Integers on the wire stay within what every JSON implementation represents exactly.
MAX_INT = 2**53 - 1

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


class _NotJSON(ValueError):
    """Something Python's ``json`` reads but RFC 8259 does not allow."""


def _no_constant(name: str) -> Any:
    raise _NotJSON(f"{name} is not JSON (RFC 8259)")


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))  # type: ignore[func-returns-value]
        raise _NotJSON(f"the name {dup[:40]!r} appears twice in an object")
    return obj


_decoder = json.JSONDecoder(parse_constant=_no_constant, object_pairs_hook=_object)
_scan_once = _decoder.scan_once  # type: ignore[attr-defined]
# A \uD800-\uDFFF escape is the only way a lone surrogate (not valid Unicode, and not
# storable as UTF-8) can get into a decoded string; only then is the object walked.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(obj: Any) -> bool:
    # A walk with a stack of its own, not recursion: the decoder reads objects
    # nested about as deep as Python's recursion limit, which a recursive walk,
    # starting deeper in the stack, would pass (RecursionError).
    todo = [obj]
    while todo:
        item = todo.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(item, dict):
            todo.extend(item)
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False


def encode(obj: dict[str, Any]) -> bytes:
    """Encode a control frame payload (without the length prefix)."""
    return _encoder.encode(obj).encode("utf-8")


def parse_json(data: bytes) -> Any:
    """The value of the UTF-8 JSON text ``data``, read strictly (RFC 8259).

    Raises :class:`FatalProtocolError` (``bad_frame``) for anything that is not one
    RFC 8259 JSON text in UTF-8 (see the module's docstring: no ``NaN`` or
    ``Infinity``, no name twice in an object, no integer of more than 4300 digits,
    no nesting deeper than Python's recursion limit), and :class:`ChatError`
    (``bad_request``) for a string (value or name) with a lone surrogate.
    """
    try:
        text = data.decode("utf-8")
        # The common case, a well-formed text with nothing after it, straight from
        # the C scanner (what JSONDecoder.decode runs, without its Python wrappers and
        # whitespace matching); anything else takes decode() for its checks and errors.
        try:
            obj, end = _scan_once(text, 0)
        except (StopIteration, ValueError):
            end = -1
        if end != len(text):
            obj = _decoder.decode(text)
    except _NotJSON as e:
        raise FatalProtocolError("bad_frame", str(e)[:120]) from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = str(e)
        if "integer string conversion" in why:  # Python's own limit, not JSON's
            why = "an integer of more than 4300 digits"
        raise FatalProtocolError("bad_frame", f"malformed JSON: {why[:80]}") from None
    # (the plain search first: a text without a \u escape, the usual, needs no pattern)
    if "\\u" in text and _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
        raise ChatError("bad_request", "strings must be valid Unicode (no lone surrogates)")
    return obj


def decode(payload: bytes) -> dict[str, Any]:
    """Decode a control frame payload (strictly: see :func:`parse_json`).

    Raises :class:`FatalProtocolError` (``bad_frame``) when the payload is not a UTF-8
    JSON object: such a peer cannot be trusted to be framing correctly any more.
    A JSON object whose ``type`` is missing or not a string raises ``bad_request``.
    """
    if not payload or payload[0] != FRAME_JSON:
        kind = payload[0] if payload else None
        raise FatalProtocolError("bad_frame", f"unsupported frame kind {kind!r}")
    obj = parse_json(payload)
    if not isinstance(obj, dict):
        raise FatalProtocolError("bad_frame", "a frame must be a JSON object")
    if not isinstance(obj.get("type"), str):
        raise ChatError("bad_request", "a frame needs a string field 'type'")
    rid = obj.get("id")
    if rid is not None and not (isinstance(rid, (str, int)) and not isinstance(rid, bool)):
        raise ChatError("bad_request", "'id' must be a string or an integer")
    if isinstance(rid, str) and len(rid) > 64:
        raise ChatError("bad_request", "'id' is longer than 64 characters")
    return obj


#: A ``send`` frame as clients spell it: compact, ``type`` first, ``id`` (an integer)
#: before ``to`` or after ``body``, an optional ``nonce`` of 1-64 bytes, and strings
#: without escapes or control characters (see :func:`compact_send`).
_STRING = rb'"([^"\\\x00-\x1f]*)"'
_ID = rb"(0|[1-9][0-9]{0,14})"
_COMPACT_SEND = re.compile(
    rb'\{"type":"send",(?:"id":' + _ID + rb",)?"
    rb'"to":'
    + _STRING
    + rb',"body":'
    + _STRING
    + rb'(?:,"nonce":"([^"\\\x00-\x1f]{1,64})")?(?:,"id":'
    + _ID
    + rb")?\}"
)


def compact_send(payload: bytes) -> tuple[int | None, str, str, str | None] | None:
    """``(id, to, body, nonce)`` of a ``send`` frame in the compact form every client
    of this project writes (``{"type":"send","id":N,"to":"..","body":".."}``, the
    nonce and the id optional, the id first or last), when its strings need no
    unescaping; else None, and the caller decodes the frame the general way.

    The fast path of the most frequent request, as the ack's is in the protocol: one
    regular expression in C instead of the JSON scanner, its key memo, the
    duplicate-name hook and the field checks.  What it accepts is exactly what
    :func:`decode` reads the same way: RFC 8259 strings with no backslash and no
    control character are their own bytes (so no lone surrogate either), an integer
    of at most 15 digits is within 2**53 - 1, every name appears once, a nonce of
    1-64 bytes has 1-64 characters; bytes that are not UTF-8 give None."""
    m = _COMPACT_SEND.fullmatch(payload)
    if m is None:
        return None
    return compact_send_fields(m)


#: ``COMPACT_SEND(buf, start, end)``: the match of :func:`compact_send`'s pattern on
#: ``buf[start:end]`` without the slice (the framing loop's fast path), or None; its
#: fields are :func:`compact_send_fields`'s.
COMPACT_SEND = _COMPACT_SEND.fullmatch


def compact_send_fields(m: re.Match[bytes]) -> tuple[int | None, str, str, str | None] | None:
    """The ``(id, to, body, nonce)`` of a match of ``COMPACT_SEND``, or None (the
    frame takes the general path: see :func:`compact_send`).

    ClientProtocol._frames (the framing loop) repeats these lines inline, to save a
    call per send: a change here is made there too.  test_protocol's
    test_compact_sends_matched_in_the_read_are_answered_as_decoded_ones holds the
    copy to what decode() reads."""
    first, to, body, nonce, last = m.groups()
    if first is not None and last is not None:  # the id twice: decode() refuses it
        return None
    rid = first if first is not None else last
    try:
        return (
            None if rid is None else int(rid),
            to.decode(),
            body.decode(),
            None if nonce is None else nonce.decode(),
        )
    except UnicodeDecodeError:
        return None


def field(
    obj: dict[str, Any],
    name: str,
    kind: type | tuple[type, ...],
    *,
    required: bool = True,
    default: Any = None,
) -> Any:
    """Return ``obj[name]`` checked against ``kind``; raise ``bad_request`` otherwise.

    ``bool`` is never accepted where ``int`` is asked for (JSON ``true`` is not 1).
    """
    if name not in obj or obj[name] is None:
        if required:
            raise ChatError("bad_request", f"missing field {name!r}")
        return default
    value = obj[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join(k.__name__ for k in kinds)
        raise ChatError("bad_request", f"field {name!r} must be {names}")
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
        raise ChatError("bad_request", f"field {name!r} is out of range (|n| <= 2**53 - 1)")
    if isinstance(value, float) and not isfinite(value):  # 1e400 reads as infinity
        raise ChatError("bad_request", f"field {name!r} must be a finite number")
    return value


def integer(
    obj: dict[str, Any],
    name: str,
    lo: int = 0,
    hi: int = MAX_INT,
    *,
    required: bool = True,
    default: Any = None,
) -> Any:
    """``obj[name]``, an integer from ``lo`` to ``hi``; ``bad_request`` otherwise (a
    float, ``true``, a string, or a number out of that range).  Absent or ``null``:
    ``default``, unless ``required``."""
    value = field(obj, name, int, required=required, default=default)
    if obj.get(name) is not None and not lo <= value <= hi:
        raise ChatError("bad_request", f"field {name!r} must be an integer from {lo} to {hi}")
    return value


def error_frame(code: str, message: str, rid: Any = None, **extra: Any) -> bytes:
    frame: dict[str, Any] = {"type": "error", "code": code, "message": message}
    if rid is not None:
        frame["id"] = rid
    frame.update(extra)
    return encode(frame)


def result_frame(rid: Any, **fields: Any) -> bytes:
    frame: dict[str, Any] = {"type": "result"}
    if rid is not None:
        frame["id"] = rid
    frame.update(fields)
    return encode(frame)


def encode_data(op: int, stream: int, offset: int, data: bytes) -> bytes:
    """A binary data frame payload (without the length prefix).

    ``stream`` is the transfer's number on this connection (from the ``file_offer``,
    ``file_resume`` or ``download`` result) and ``offset`` the absolute position of the
    first data byte in the file, so every frame says exactly where its bytes belong.
    """
    return DATA_HEADER.pack(FRAME_BINARY, op, stream, offset) + data


def decode_data(payload: bytes) -> tuple[int, int, int, bytes]:
    """``(op, stream, offset, data)`` of a binary data frame payload.

    Raises :class:`FatalProtocolError` (``bad_frame``) for a short header or an unknown
    op: the peer's framing cannot be trusted after that.
    """
    if len(payload) < DATA_HEADER.size or payload[0] != FRAME_BINARY:
        raise FatalProtocolError("bad_frame", "a data frame needs a 14-byte header")
    _, op, stream, offset = DATA_HEADER.unpack_from(payload)
    if op not in _DATA_OPS:
        raise FatalProtocolError("bad_frame", f"unknown data frame op {op}")
    if offset > MAX_INT:
        raise FatalProtocolError("bad_frame", "data frame offset out of range")
    return op, stream, offset, payload[DATA_HEADER.size :]
