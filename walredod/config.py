"""Settings, validated with pydantic: a wrong key, type or range fails with the key's path and the reason."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


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
        description="User of their own the children run as when we are root (PostgreSQL refuses root, and a "
        "child must not reach the daemon's sockets or processes); default 'walredod-redo'. Ignored when not root.",
    )
    sandbox: Literal["required", "best_effort", "off"] = Field(
        "required",
        description="The redo child's sandbox (seccomp allow-list, Landlock, rlimits, not dumpable), entered before "
        "it reads a request. 'required': a child whose kernel lacks seccomp or Landlock refuses to start, with an "
        "error; 'best_effort': it starts with a warning and whatever the kernel has; 'off': none. Vanilla only: "
        "Neon's binary has its own.",
    )
    child_address_space_mb: int = Field(
        1024, ge=256, le=1024 * 1024,
        description="Address space limit of a sandboxed child (MB); a request needing more fails with redo_failed.",
    )
    source_logs_hint_bits: bool = Field(
        False,
        description="True when the WAL comes from a cluster with wal_log_hints = on or data checksums: "
        "PostgreSQL's recovery then stamps the heap page of a visibility record with its LSN, and so do we.",
    )
    wal_format: Literal["vanilla", "neon"] = Field(
        "vanilla",
        description="Heap record format of the WAL (kind = 'vanilla'): 'vanilla' for vanilla PostgreSQL 15, "
        "'neon' for Neon's PostgreSQL 15 compute, whose heap records carry the command id. A record in the other "
        "format is refused as an invalid request, never applied. Neon's binary (kind = 'neon') reads only 'neon'.",
    )
    request_timeout: float = Field(60.0, gt=0, description="Seconds a child may take for one request.")
    start_timeout: float = Field(30.0, gt=0, description="Seconds a child may take to start and answer a ping.")
    keep_spare: bool = Field(
        True, description="Keep a second child started and warm, so a child's death costs no start-up."
    )
    spin_wait_us: int = Field(
        50, ge=0, le=1000,
        description="Microseconds a redo child waiting for its next request, and the engine waiting for a child's "
        "reply, poll without sleeping (yielding the CPU in between) before they sleep: a peer on another CPU then "
        "finds them awake, where waking a process whose CPU went idle costs more than a short request. 0: sleep at "
        "once. (Our local-path client waits the same way for its replies, 50 µs.)",
    )
    shared_buffers_kb: int = Field(
        1024, ge=128, le=1024 * 1024, description="Child's shared_buffers; redo drop cost grows with it."
    )


    @model_validator(mode="after")
    def _neon_binary_reads_neon_wal(self) -> EngineSettings:
        if self.kind == "neon" and "wal_format" in self.model_fields_set and self.wal_format != "neon":
            raise ValueError("kind = 'neon' (Neon's binary) reads only wal_format = 'neon'")
        return self


class DaemonSettings(Strict):
    """How `walredod serve` listens, how many workers it runs, and how it heals them."""

    endpoints: list[str] = Field(
        default_factory=lambda: [default_endpoint()], min_length=1,
        description="ZeroMQ endpoints clients connect to (ipc:// and/or tcp://).",
    )
    workers: int = Field(0, ge=0, le=256, description="Worker processes; 0 means one per CPU.")
    worker_credit: int = Field(4, ge=1, le=64, description="Requests a worker may hold at once.")
    spill_factor: float = Field(
        0.25, ge=0, le=100,
        description="A worker holding more than (1 + spill_factor) x the average load is passed over.",
    )
    heartbeat_interval: float = Field(1.0, gt=0, le=60, description="Seconds between heartbeats.")
    heartbeat_liveness: int = Field(3, ge=1, le=100, description="Missed heartbeats before a worker is dead.")
    restart_backoff_max: float = Field(30.0, gt=0, description="Longest wait before restarting a failing worker.")
    max_failed_starts: int = Field(
        5, ge=1, description="Worker starts in a row that may fail before its slot is reported down and parked.",
    )
    max_pending: int = Field(10_000, ge=1, description="Requests held at once; more are refused as unavailable.")
    max_pending_bytes: int = Field(
        256 * 1024 * 1024, ge=1024 * 1024,
        description="Bytes of requests held at once (waiting or in flight); more are refused as unavailable.",
    )
    max_memory_bytes: int = Field(
        1024 * 1024 * 1024, ge=64 * 1024 * 1024,
        description="Resident memory of the supervisor past which it drops every client connection (freeing what "
        "ZeroMQ buffered for them); counted in walredod_memory_resets.",
    )
    max_unread_replies: int = Field(
        10_000, ge=1,
        description="Replies one client connection may leave unread in the supervisor; past that its replies are "
        "dropped (counted in walredod_dropped_replies) rather than held without bound. Keep it above "
        "max_pending_per_client, so a client that reads late but within its share loses nothing.",
    )
    max_pending_per_client: int | None = Field(
        None, ge=1,
        description="Requests one client connection may have held at once; more are refused as unavailable. "
        "Default: half of max_pending, so one client never shuts the others out.",
    )
    max_request_bytes: int = Field(
        64 * 1024 * 1024, ge=16 * 1024, le=2**31 - 1,
        description="Largest request accepted (all frames); the redo child's limit is a C int, hence the bound.",
    )
    shutdown_timeout: float = Field(10.0, ge=0, description="Seconds to finish in-flight requests on SIGTERM.")
    cpu_placement: Literal["pair", "none"] = Field(
        "pair",
        description="'pair': worker i and its redo children share CPU i (mod the CPUs we may use), so their "
        "round trips never wake another CPU, and the supervisor keeps to the last CPU; "
        "'none': the scheduler decides.",
    )
    direct_data_path: bool = Field(
        True,
        description="Workers also take requests straight from clients on this machine (each on an ipc socket "
        "beside the first ipc:// endpoint; the supervisor tells clients where): one ZeroMQ hop instead of two.",
    )
    local_data_path: bool = Field(
        True,
        description="With the direct data path, clients on this machine send relation-page requests straight to a "
        "worker slot's redo child over a Unix socket beside the worker's endpoint (<stem>-worker-<slot>.local): "
        "no Python process and no ZeroMQ in between (docs/local-data-path.md).",
    )
    metrics_address: str | None = Field(
        None, description="host:port of the Prometheus metrics endpoint; none when unset.",
    )
    # Who may connect (walredod/daemon/endpoints.py).
    socket_group: str | None = Field(
        None,
        description="Group of every ipc:// socket file (frontend and workers' direct endpoints): its members may "
        "connect. Default: the daemon's own group. The daemon's user must be in it.",
    )
    socket_mode: str = Field(
        "0660", pattern=r"^0?[0-7]{3}$",
        description="Permissions of every ipc:// socket file, octal; connecting needs write permission.",
    )
    curve_secret_key_file: Path | None = Field(
        None,
        description="The daemon's CURVE key pair for tcp:// endpoints (the .key_secret file of `walredod keygen`).",
    )
    curve_client_keys: Path | None = Field(
        None, description="Directory of the public keys (*.key) of the clients allowed on tcp:// endpoints.",
    )
    allow_plain_tcp: bool = Field(
        False,
        description="Serve tcp:// endpoints without CURVE: anyone who reaches the port gets pages. Warned at start.",
    )


class Settings(Strict):
    """The whole configuration file: [daemon] and [engine]."""

    daemon: DaemonSettings = Field(default_factory=DaemonSettings)
    engine: EngineSettings = Field(default_factory=EngineSettings)


def default_endpoint() -> str:
    """An ipc socket in the runtime directory (systemd's RuntimeDirectory when set)."""
    runtime = os.environ.get("RUNTIME_DIRECTORY") or os.environ.get("XDG_RUNTIME_DIR")
    if not runtime:
        runtime = "/run/walredod" if os.geteuid() == 0 else f"/tmp/walredod-{os.geteuid()}"
    return f"ipc://{runtime.split(':')[0]}/walredod.sock"


def load_settings(path: Path | None, overrides: dict | None = None) -> Settings:
    """Read and validate a TOML file (or the defaults), then apply command-line overrides (dotted keys)."""
    import tomli

    data: dict = {}
    if path is not None:
        try:
            with open(path, "rb") as f:
                data = tomli.load(f)
        except OSError as exc:
            raise ConfigError(f"{path}: {exc.strerror}") from None
        except tomli.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for dotted, value in (overrides or {}).items():
        section, key = dotted.split(".", 1)
        data.setdefault(section, {})[key] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"{path or 'settings'}: {problems}") from None


class ConfigError(ValueError):
    """The configuration is wrong; the message names the key and the reason."""
