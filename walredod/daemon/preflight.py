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
    return engine_path_problems(settings.engine) + setting_problems(settings.daemon) + auth.setting_problems(settings.daemon)


def check(settings: Settings, source: object = None) -> None:
    """Raise ConfigError listing every problem, each with its setting's name."""
    if found := problems(settings):
        raise ConfigError(f"{source or 'settings'}: " + "; ".join(found))
