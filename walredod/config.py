"""Settings, validated with pydantic: a wrong key, type or range fails with the key's path and the reason."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


def default_data_dir() -> Path:
    """Where datadirs live when nothing says otherwise.

    Root (systemd, containers, CI) uses /var/lib/walredod, readable by the unprivileged user the redo children run
    as; anyone else their own state directory.
    """
    if env := os.environ.get("WALREDOD_DATA_DIR"):
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/walredod")
    state_home = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state_home) / "walredod"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineSettings(Strict):
    """How one redo engine starts and runs its PostgreSQL children."""

    kind: Literal["vanilla", "neon"] = Field(
        "vanilla",
        description="'vanilla': stock PostgreSQL 15 with our extension, for WAL from vanilla PostgreSQL 15. "
        "'neon': Neon's `postgres --wal-redo` binary, for WAL from Neon's compute (its heap records differ).",
    )
    data_dir: Path = Field(default_factory=default_data_dir, description="Template and child datadirs live here.")
    postgres_bin: Path | None = Field(
        None, description="PostgreSQL 15 `postgres` binary (vanilla); default: the Debian package's."
    )
    extension_path: Path | None = Field(
        None, description="Our built walredod_redo.so (vanilla); default: the one the set-up built."
    )
    neon_postgres_bin: Path | None = Field(None, description="Neon's `postgres` binary (kind = 'neon').")
    neon_ld_library_path: str = Field("", description="LD_LIBRARY_PATH for Neon's binary (its only environment).")
    run_as: str | None = Field(
        None,
        description="Unprivileged user the children run as when we are root (PostgreSQL refuses root); "
        "default 'walredod'. Ignored when not root.",
    )
    request_timeout: float = Field(60.0, gt=0, description="Seconds a child may take for one request.")
    start_timeout: float = Field(30.0, gt=0, description="Seconds a child may take to start and answer a ping.")
    keep_spare: bool = Field(
        True, description="Keep a second child started and warm, so a child's death costs no start-up."
    )
    shared_buffers_kb: int = Field(
        1024, ge=128, le=1024 * 1024, description="Child's shared_buffers; redo drop cost grows with it."
    )
