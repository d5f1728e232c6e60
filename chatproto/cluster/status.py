"""``chatrealmctl cluster status``: the workers of a cluster, read without a reactor.

The live workers and their part of the session directory come from Redis (what each
worker's heartbeat wrote, see :mod:`chatproto.cluster.bus`), the writers and the safe
position from PostgreSQL.  A small synchronous Redis client is enough here: a few
commands, one connection, a timeout.
"""

from __future__ import annotations

import json
import socket
from typing import Any

__all__ = ["RedisReplyError", "redis_call", "workers"]


class RedisReplyError(Exception):
    """Redis answered with an error."""


def _read_reply(f: Any) -> Any:
    line = f.readline()
    if not line:
        raise OSError("Redis closed the connection")
    kind, rest = line[:1], line[1:].rstrip(b"\r\n")
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RedisReplyError(rest.decode("utf-8", "replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2].decode("utf-8", "replace")
    if kind == b"*":
        n = int(rest)
        return None if n < 0 else [_read_reply(f) for _ in range(n)]
    raise OSError(f"unexpected reply from Redis: {line[:40]!r}")


def redis_call(address: str, *commands: list[str], timeout: float = 5.0) -> list[Any]:
    """Run ``commands`` (each a list of words) on Redis at ``HOST:PORT``; their
    replies.  Raises ``OSError`` when Redis cannot be reached."""
    host, _, port = address.rpartition(":")
    out = b""
    for words in commands:
        out += b"*%d\r\n" % len(words)
        for w in words:
            b = w.encode()
            out += b"$%d\r\n%s\r\n" % (len(b), b)
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(out)
        with s.makefile("rb") as f:
            return [_read_reply(f) for _ in commands]


def workers(address: str, prefix: str, timeout: float = 5.0) -> dict[str, dict[str, Any]]:
    """The live workers: name -> the description its last heartbeat wrote, with
    ``online``: its part of the session directory (user -> visible sessions)."""
    [names] = redis_call(address, ["SMEMBERS", f"{prefix}:workers"], timeout=timeout)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(names or ()):
        text, flat = redis_call(
            address,
            ["GET", f"{prefix}:worker:{name}"],
            ["HGETALL", f"{prefix}:online:{name}"],
            timeout=timeout,
        )
        if text is None:
            continue  # its description expired: gone
        try:
            desc = json.loads(text)
        except ValueError:
            continue
        flat = flat or []
        desc["online"] = {k: int(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
        out[name] = desc
    return out
