#!/usr/bin/env bash
# One-time set-up of a machine for walredod: PostgreSQL 15 (server and headers), libseccomp (the redo child's
# sandbox), libzstd and liblz4 headers (the child decompresses block images itself), the daemon's user and the user
# of its own the redo children run as when the daemon is root, the Python packages, and our PostgreSQL extension.
# Idempotent: a second run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
RUN_AS_USER="${WALREDOD_USER:-walredod}"
# Redo children run WAL from tenants: a uid of their own, so they cannot reach the daemon's sockets or processes.
CHILD_USER="${WALREDOD_CHILD_USER:-walredod-redo}"

have_pg15_dev() {
    [ -x /usr/lib/postgresql/15/bin/postgres ] && [ -x /usr/lib/postgresql/15/bin/pg_config ] &&
        [ -f /usr/include/postgresql/15/server/postgres.h ] && [ -f /usr/include/seccomp.h ] &&
        [ -f /usr/include/zstd.h ] && [ -f /usr/include/lz4.h ]
}

if ! have_pg15_dev; then
    echo "== installing PostgreSQL 15 server, development files, libseccomp, libzstd and liblz4 headers (apt-get)"
    $SUDO apt-get update -qq
    # server-dev pulls the newest 15.x server, so the extension is built for the server it runs in.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        postgresql-15 postgresql-server-dev-15 libseccomp-dev libzstd-dev liblz4-dev make gcc >/dev/null
fi

if ! command -v systemd-analyze >/dev/null 2>&1; then
    echo "== installing systemd's tools (the tests check the unit offline with systemd-analyze; nothing is started)"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

if [ "$(id -u)" -eq 0 ] && ! id "$RUN_AS_USER" >/dev/null 2>&1; then
    echo "== creating the system user $RUN_AS_USER (the daemon under its systemd unit)"
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$RUN_AS_USER"
fi
if [ "$(id -u)" -eq 0 ] && ! id "$CHILD_USER" >/dev/null 2>&1; then
    echo "== creating the system user $CHILD_USER (redo children, when the daemon runs as root)"
    useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin "$CHILD_USER"
fi

echo "== installing Python packages"
python3 -m pip install -q --disable-pip-version-check -e '.[test,bench]'

echo "== building the redo extension"
make -s -C pgext PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config >/dev/null
mkdir -p walredod/_native
cp pgext/walredod_redo.so walredod/_native/walredod_redo.so
echo "== set-up done"
