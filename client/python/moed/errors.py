"""The exceptions of the moed package.

Every error moed or the package reports is a :class:`MoedError` with ``code``
(an errno name such as ``"ENOENT"`` for the shared-memory session, a gRPC
status name such as ``"NOT_FOUND"`` for the remote one) and ``message`` (the
text moed or libmoe-client gave, unchanged).  The subclasses say what to do:

* :class:`ConnectionLost`: moed is gone (stopped, crashed, restarted) or not
  there; start it and call ``reconnect()`` (or connect again).
* :class:`SessionClosed`: the session was closed by its owner.
* :class:`ModelNotFound`: no such model, or the layer is not one of its MoE
  layers.
* :class:`InvalidRequest`: wrong shape, dtype or routing, a request larger
  than the arena, or moed's own validation refused it.
* :class:`Timeout`: ``Pending.wait(timeout)`` ran out; the request is still
  in flight and may be waited for again.
* :class:`LibraryNotFound`: libmoe-client could not be loaded.
"""
from __future__ import annotations

import errno as _errno


class MoedError(Exception):
    """An error of moed or of this package.

    Attributes:
        code: errno name (shared memory) or gRPC status name (remote).
        message: moed's (or libmoe-client's) own text.
    """

    def __init__(self, message: str, code: str = "EIO") -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.message} [{self.code}]"


class ConnectionLost(MoedError, ConnectionError):
    """moed went away (stopped, crashed, restarted) or is not listening.

    The session is unusable; once moed is back, ``session.reconnect()`` makes a
    new one on the same socket or address.
    """


class SessionClosed(MoedError):
    """The session was closed with ``close()`` (or its ``with`` block ended)."""


class ModelNotFound(MoedError, LookupError):
    """No model of that name is loaded, or the layer is not a MoE layer of it."""


class InvalidRequest(MoedError, ValueError):
    """A request moed cannot take: shape, dtype, routing, size, or moed's checks."""


class Timeout(MoedError, TimeoutError):
    """``Pending.wait(timeout)`` ran out; the request is still in flight."""


class LibraryNotFound(MoedError, OSError):
    """libmoe-client could not be found or loaded (set MOED_CLIENT_LIB)."""


def errno_name(rc: int) -> str:
    """'ENOENT' for -2 or 2; 'E<n>' for a number errno does not know."""
    return _errno.errorcode.get(abs(rc), f"E{abs(rc)}")


def from_errno(rc: int, message: str) -> MoedError:
    """The exception for a -errno of libmoe-client or a completion's status."""
    n = abs(rc)
    code = errno_name(rc)
    if n in (_errno.ECONNRESET, _errno.EPIPE, _errno.ENOTCONN, _errno.EPROTO,
             _errno.ECONNREFUSED):
        return ConnectionLost(message, code)
    if n == _errno.ENOENT:
        return ModelNotFound(message, code)
    if n in (_errno.EINVAL, _errno.ERANGE, _errno.E2BIG, _errno.ENOMEM, _errno.EMSGSIZE):
        return InvalidRequest(message, code)
    if n == _errno.ETIMEDOUT:
        return Timeout(message, code)
    return MoedError(message, code)


def from_grpc(status_name: str, message: str) -> MoedError:
    """The exception for a gRPC status (its name, e.g. 'NOT_FOUND')."""
    if status_name == "UNAVAILABLE":
        return ConnectionLost(message + "; call reconnect() once moed is back", status_name)
    if status_name == "NOT_FOUND":
        return ModelNotFound(message, status_name)
    if status_name in ("INVALID_ARGUMENT", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED",
                       "FAILED_PRECONDITION"):
        return InvalidRequest(message, status_name)
    if status_name == "DEADLINE_EXCEEDED":
        return Timeout(message, status_name)
    return MoedError(message, status_name)
