"""Typed errors, shared by the engine, the daemon and the client.

Each error kind has a stable ``code``: the daemon sends it on the wire and the client raises the same class again,
so a caller can tell "my request is wrong" from "try again" without parsing messages.
"""

from __future__ import annotations

from typing import NamedTuple


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
    """The request was in flight twice in a row when what served it died: two redo children of one engine, or two
    worker processes of the daemon. It is not tried again."""

    code = "poison"


class Unavailable(WalredodError):
    """No redo child could serve the request (it cannot be started, or the engine or daemon is shutting down)."""

    code = "unavailable"


ERROR_CLASSES: dict[str, type[WalredodError]] = {
    cls.code: cls
    for cls in (WalredodError, InvalidRequest, UnsupportedVersion, RedoFailed, RedoTimeout, PoisonRequest, Unavailable)
}


class SqlState(NamedTuple):
    """A SQLSTATE our redo child ends with, and what the engine makes of it."""

    code: str
    errcode: str  # the macro the C extension raises it with (PostgreSQL's utils/errcodes.h)
    error: type[WalredodError]


REDO_CHILD_SQLSTATES: dict[str, SqlState] = {state.code: state for state in (
    SqlState("08P01", "ERRCODE_PROTOCOL_VIOLATION", InvalidRequest),  # a malformed pipe message
    SqlState("XX001", "ERRCODE_DATA_CORRUPTED", InvalidRequest),  # a record's length, CRC or image is wrong
    SqlState("0A000", "ERRCODE_FEATURE_NOT_SUPPORTED", InvalidRequest),  # a resource manager we do not apply
    SqlState("22023", "ERRCODE_INVALID_PARAMETER_VALUE", InvalidRequest),  # a record not of the requested block
    SqlState("WR001", "ERRCODE_WALREDOD_WAL_FORMAT_MISMATCH", InvalidRequest),  # a heap record of the other WAL format
)}
"""The one table of SQLSTATEs with a meaning of their own (docs/redo-child-protocol.md, "Errors"); any other
SQLSTATE is redo itself failing (RedoFailed)."""


def error_for_sqlstate(sqlstate: str) -> type[WalredodError]:
    """The error class a redo child's death with ``sqlstate`` is reported as."""
    state = REDO_CHILD_SQLSTATES.get(sqlstate)
    return state.error if state is not None else RedoFailed
