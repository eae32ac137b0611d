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
