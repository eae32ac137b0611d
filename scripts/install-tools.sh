#!/usr/bin/env bash
# Installs what the tests and lint need, when missing: openssl, rustfmt, clippy.
set -euo pipefail

if ! command -v openssl >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing openssl" >&2
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq openssl >/dev/null
    else
        echo "openssl is required for the tests; please install it" >&2
        exit 1
    fi
fi

if command -v rustup >/dev/null 2>&1; then
    for c in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep -q "^$c"; then
            rustup component add "$c" >&2
        fi
    done
fi

# Third-party Workload API clients the interop tests drive (tests/tests/interop_clients.rs):
# py-spiffe on grpcio in a venv (with the official MCP SDK and PyJWT for the OAuth tests,
# tests/tests/oauth.rs), and Node's grpc-js, both under the target dir.
INTEROP="${CARGO_TARGET_DIR:-$(cd "$(dirname "$0")/.." && pwd)/target}/interop"
PY_PACKAGES=(spiffe==0.3.2 grpcio==1.85.3 mcp==2.3.0 "PyJWT[crypto]==2.15.1")
# playwright-core drives Debian's chromium in the console's browser tests
# (tests/tests/console.rs); it downloads no browser of its own.
NODE_PACKAGES=(@grpc/grpc-js@1.14.7 @grpc/proto-loader@0.8.1 playwright-core@1.64.1)

if ! command -v python3 >/dev/null 2>&1 || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing python3 and python3-venv" >&2
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3 python3-venv >/dev/null
    else
        echo "python3 with venv is required for the interop tests; please install it" >&2
        exit 1
    fi
fi
stamp="$INTEROP/venv/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${PY_PACKAGES[*]}" ]; then
    echo "installing ${PY_PACKAGES[*]} into $INTEROP/venv" >&2
    mkdir -p "$INTEROP"
    python3 -m venv "$INTEROP/venv"
    "$INTEROP/venv/bin/pip" install -q --disable-pip-version-check "${PY_PACKAGES[@]}" >&2
    echo "${PY_PACKAGES[*]}" > "$stamp"
fi

if ! command -v npm >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing nodejs and npm" >&2
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq nodejs npm >/dev/null
    else
        echo "node and npm are required for the interop tests; please install them" >&2
        exit 1
    fi
fi
stamp="$INTEROP/node/.installed"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${NODE_PACKAGES[*]}" ]; then
    echo "installing ${NODE_PACKAGES[*]} into $INTEROP/node" >&2
    mkdir -p "$INTEROP/node"
    (cd "$INTEROP/node" && npm install --silent --no-audit --no-fund --no-save "${NODE_PACKAGES[@]}" >&2)
    echo "${NODE_PACKAGES[*]}" > "$stamp"
fi

# Debian's chromium, headless, for the console's browser tests.
if ! command -v chromium >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium" >&2
        SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
        $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
            apt-get install -y -qq chromium >/dev/null
    else
        echo "chromium is required for the console's browser tests; please install it" >&2
        exit 1
    fi
fi

# A running PostgreSQL for the PostgreSQL datastore's tests (agentd/src/datastore/pg_store.rs):
# reachable as postgres on 127.0.0.1:5432 without a password, or wherever
# AGENTD_TEST_POSTGRES points (then this leaves it alone). Installs Debian's server and
# starts its cluster when missing; each test makes and drops its own database.
if [ -z "${AGENTD_TEST_POSTGRES:-}" ]; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    pg_ready() { command -v pg_isready >/dev/null 2>&1 && pg_isready -q -h 127.0.0.1 -p 5432; }
    if ! pg_ready; then
        if ! command -v pg_ctlcluster >/dev/null 2>&1 || [ -z "$(ls /etc/postgresql 2>/dev/null)" ]; then
            if command -v apt-get >/dev/null 2>&1; then
                echo "installing postgresql" >&2
                $SUDO apt-get update -qq && $SUDO env DEBIAN_FRONTEND=noninteractive \
                    apt-get install -y -qq postgresql >/dev/null
            else
                echo "PostgreSQL is required for the datastore tests; please install and start it" >&2
                exit 1
            fi
        fi
        version="$(ls /etc/postgresql | sort -V | tail -1)"
        hba="/etc/postgresql/$version/main/pg_hba.conf"
        # The tests connect as postgres over TCP without a password: trust on loopback, for
        # the postgres user only (a test machine's cluster).
        if ! $SUDO grep -qE '^host +all +(all|postgres) +127.0.0.1/32 +trust' "$hba"; then
            $SUDO sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
        fi
        echo "starting PostgreSQL $version" >&2
        # Started by the package already (systemd hosts): reload, so the line above counts.
        $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start \
            || $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true
        for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
        if ! pg_ready; then
            echo "PostgreSQL did not start on 127.0.0.1:5432 (see /var/log/postgresql)" >&2
            exit 1
        fi
    fi
fi
