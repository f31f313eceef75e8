"""Typed errors, shared by the engine, the daemon and the client.

Each error kind has a stable ``code``: the daemon sends it on the wire and the client raises the same class again,
so a caller can tell "my request is wrong" from "try again" without parsing messages.
"""

from __future__ import annotations


class WalredodError(Exception):
    """Base of every error walredod reports about a request."""

    code = "internal"


class InvalidRequest(WalredodError):
    """The request itself is wrong (bad tag, page size, a record that is corrupt, of an unsupported kind, or that
    does not touch the requested page). Sending it again gives the same answer."""

    code = "invalid_request"


class UnsupportedVersion(InvalidRequest):
    """The request speaks a version of the client protocol this daemon does not."""

    code = "unsupported_version"


class RedoFailed(WalredodError):
    """PostgreSQL's redo raised an error or crashed while applying the records."""

    code = "redo_failed"


class RedoTimeout(WalredodError):
    """The request was not answered within its deadline; the redo child was killed and replaced."""

    code = "timeout"


class PoisonRequest(WalredodError):
    """The request killed a redo child more than once; it is not tried again."""

    code = "poison"


class Unavailable(WalredodError):
    """No redo child could serve the request (it cannot be started, or the engine or daemon is shutting down)."""

    code = "unavailable"


ERROR_CLASSES: dict[str, type[WalredodError]] = {
    cls.code: cls
    for cls in (WalredodError, InvalidRequest, UnsupportedVersion, RedoFailed, RedoTimeout, PoisonRequest, Unavailable)
}
