"""Failures of a client command worded as one line for a person (``chatproto``, TUI)."""

from __future__ import annotations

from twisted.internet import error as netError
from twisted.python.failure import Failure

from chatproto.client import ConnectionDone, RemoteError


class CommandError(Exception):
    """A failure already worded for the user; ``status`` is the exit code."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _describe_reason(reason: Failure | None) -> str:
    if reason is None:
        return "the connection closed"
    value = reason.value
    if reason.check(netError.ConnectionDone, netError.ConnectionLost) is None:
        # pyOpenSSL errors carry [(library, function, reason), ...]
        args = getattr(value, "args", ())
        if args and isinstance(args[0], list) and args[0] and isinstance(args[0][0], tuple):
            return "TLS error: " + "; ".join(str(e[-1]) for e in args[0])
    return reason.getErrorMessage().rstrip(".")


#: Added to a failed certificate check: the usual cause is a realm certificate signed
#: by a CA of its own (``chatrealmctl gen-certs``) that the client was not told about.
CA_HINT = (
    " (is the realm's certificate signed by a CA of its own? give it with --ca FILE, "
    "e.g. the ca.pem that 'chatrealmctl gen-certs' wrote)"
)


def explain(exc: BaseException, server: str, reason: Failure | None = None) -> CommandError:
    """Word any failure of a command as one line for stderr."""
    err = _explain(exc, server, reason)
    if "certificate verify failed" in str(err) and "--ca" not in str(err):
        return CommandError(str(err) + CA_HINT, err.status)
    return err


def _explain(exc: BaseException, server: str, reason: Failure | None) -> CommandError:
    if isinstance(exc, CommandError):
        return exc
    if isinstance(exc, RemoteError):
        return CommandError(f"{exc.code}: {exc.message}")
    if isinstance(exc, netError.ConnectError):
        return CommandError(f"cannot connect to {server}: {str(exc).strip().rstrip('.')}")
    if isinstance(exc, (ConnectionDone, netError.ConnectionDone, netError.ConnectionLost)):
        return CommandError(f"connection to {server} failed: {_describe_reason(reason)}")
    if type(exc).__module__.startswith("service_identity"):
        return CommandError(
            f"connection to {server} failed: the realm's certificate does not match the "
            f"expected name (--realm): {exc}"
        )
    if type(exc).__module__.startswith("OpenSSL"):
        return CommandError(f"connection to {server} failed: {_describe_reason(Failure(exc))}")
    if isinstance(exc, OSError):
        return CommandError(f"{server}: {exc.strerror or exc}")
    return CommandError(f"unexpected error: {type(exc).__name__}: {exc}")
