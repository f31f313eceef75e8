"""Checks of a configuration against this machine, at `walredod check-config`, at start and at reload.

Pydantic checks each value's form (walredod/config.py); here we check what the values name: files, directories,
groups. A configured path that is not there is an error naming its setting, never a reason to use a default.
"""

from __future__ import annotations

from walredod.config import ConfigError, Settings
from walredod.daemon import auth
from walredod.daemon.endpoints import setting_problems
from walredod.engine.datadir import engine_path_problems


def problems(settings: Settings) -> list[str]:
    found = engine_path_problems(settings.engine) + setting_problems(settings.daemon)
    found += auth.setting_problems(settings.daemon)
    d = settings.daemon
    if d.max_memory_bytes < 2 * d.max_pending_bytes:
        found.append(f"daemon.max_memory_bytes: {d.max_memory_bytes} leaves no room for daemon.max_pending_bytes "
                     f"({d.max_pending_bytes}) of requests and their replies: make it at least twice that")
    return found


def check(settings: Settings, source: object = None) -> None:
    """Raise ConfigError listing every problem, each with its setting's name."""
    if found := problems(settings):
        raise ConfigError(f"{source or 'settings'}: " + "; ".join(found))
