"""Where the daemon's sockets live: the workers' direct endpoints and the socket files ZeroMQ leaves behind."""

from __future__ import annotations

import contextlib
import os


def remove_ipc_file(endpoint: str | None) -> None:
    """ZeroMQ does not remove an ipc:// socket file when its socket closes."""
    if endpoint and endpoint.startswith("ipc://"):
        with contextlib.suppress(OSError):
            os.unlink(endpoint[len("ipc://"):])


def direct_endpoint_base(daemon_settings) -> str | None:
    """Workers' direct endpoints are named after the first ipc:// frontend endpoint (same directory, so the same
    access rules): ``ipc:///run/walredod/walredod.sock`` gives ``.../walredod-worker-<slot>.sock``, named by slot so
    clients' connections reach the slot's next worker after a restart. None (no direct path) without an ipc://
    endpoint: tcp:// clients may be on other machines."""
    if not daemon_settings.direct_data_path:
        return None
    for endpoint in daemon_settings.endpoints:
        if endpoint.startswith("ipc://"):
            stem = endpoint.removesuffix(".sock")
            return f"{stem}-worker"
    return None


def local_socket_path(daemon_settings, slot: int) -> str | None:
    """A slot's socket of the local data path (docs/local-data-path.md), beside its direct endpoint and named by slot
    like it: ``.../walredod-worker-<slot>.local``. None without the direct data path or with the local path off."""
    base = direct_endpoint_base(daemon_settings)
    if base is None or not daemon_settings.local_data_path:
        return None
    return f"{base[len('ipc://'):]}-{slot}.local"
