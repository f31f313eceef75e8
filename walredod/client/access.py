"""Why a client cannot reach an ipc:// endpoint, in words, instead of a bare timeout.

ZeroMQ connects in the background and retries forever, so a socket file the client may not open looks exactly
like a daemon that does not answer. A plain AF_UNIX connect to the path tells the cases apart.
"""

from __future__ import annotations

import os
import socket


def ipc_problem(endpoint: str) -> str | None:
    """None when ``endpoint`` is not ipc:// or something accepts connections on it; otherwise why not."""
    if not endpoint.startswith("ipc://"):
        return None
    path = endpoint[len("ipc://"):]
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except PermissionError:
        return f"permission denied on {_denied_at(path)} (the daemon's daemon.socket_group and socket_mode say " \
               "who may connect)"
    except FileNotFoundError:
        return f"no socket at {path} (is the daemon running?)"
    except ConnectionRefusedError:
        return f"nothing listens on {path} (left by a daemon that stopped?)"
    except OSError as error:
        return f"{path}: {error.strerror}" if error.strerror else None
    finally:
        probe.close()
    return None


def permission_denied(endpoint: str) -> str | None:
    """The problem, when it is one that waiting will not cure."""
    problem = ipc_problem(endpoint)
    return problem if problem and problem.startswith("permission denied") else None


def _denied_at(path: str) -> str:
    """The first directory on the way we may not search, else the socket itself."""
    parts = os.path.abspath(path).split(os.sep)
    for end in range(2, len(parts)):
        directory = os.sep.join(parts[:end]) or os.sep
        if not os.access(directory, os.X_OK):
            return directory
    return path
