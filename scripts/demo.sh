#!/usr/bin/env bash
# `make demo`: a server and a node agent in a temp dir; the current user's processes are
# registered as an agent; we fetch its SVID, watch it rotate, revoke it, and stop everything
# cleanly.
#
# Environment: AGENTD_BIN (the agentd binary, default target/debug/agentd), TMPDIR (where the
# temp dir goes, default /tmp; keep it short: Unix socket paths are limited to 108 bytes).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${AGENTD_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/agentd}"
if [ ! -x "$BIN" ]; then
    echo "error: no agentd binary at $BIN (run 'make build', or set AGENTD_BIN)" >&2
    exit 1
fi
if ! command -v openssl >/dev/null 2>&1; then
    echo "error: make demo needs openssl (to verify the SVID and print its serial)" >&2
    exit 1
fi
DEMO="$(mktemp -d "${TMPDIR:-/tmp}/agentd-demo.XXXXXX")"
ADMIN="$DEMO/admin.sock"
SOCK="$DEMO/api.sock"
# The daemons this script started: their own pids (each is started directly with `&`, so
# `$!` is the agentd process itself, not a subshell) and names.
PIDS=()
NAMES=()

# Stops every daemon this script started, the last started first, and waits until each has
# exited (SIGKILL after 10 s).
stop_daemons() {
    local i pid
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
        pid="${PIDS[$i]}"
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        echo "stopped the ${NAMES[$i]} (pid $pid)"
    done
    PIDS=()
    NAMES=()
}

# On every exit (success, an error under set -e, or a signal): stop the daemons, show the end
# of their logs if something failed, and remove the temp dir.
on_exit() {
    local status=$?
    trap - EXIT INT TERM HUP
    stop_daemons >/dev/null
    if [ "$status" -ne 0 ]; then
        for log in "$DEMO"/server.log "$DEMO"/node.log; do
            [ -s "$log" ] || continue
            echo "--- last lines of $(basename "$log"):" >&2
            tail -n 20 "$log" >&2
        done
    fi
    rm -rf "$DEMO"
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
agentd() { "$BIN" "$@"; }
wait_for() { # wait_for WHAT CMD...: up to 10 s
    local what="$1"
    shift
    for _ in $(seq 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
    echo "error: timed out waiting for $what" >&2
    return 1
}
# The serial of the first X.509-SVID as the certificate holds it (hex, leading zeros kept).
cert_serial() {
    rm -rf "$DEMO/current"
    agentd api fetch x509 --socket-path "$SOCK" --write "$DEMO/current" >/dev/null
    openssl x509 -in "$DEMO/current/svid.0.pem" -noout -serial | cut -d= -f2 | tr 'A-F' 'a-f'
}

step "Starting the server (trust domain example.org, data in $DEMO/server)"
"$BIN" server run --data-dir "$DEMO/server" --bind-address 127.0.0.1:0 \
    --admin-socket "$ADMIN" >"$DEMO/server.log" 2>&1 &
PIDS+=($!)
NAMES+=(server)
echo "server pid: $!"
wait_for "the server" agentd healthcheck --admin-socket "$ADMIN"
ADDR="$(agentd healthcheck --admin-socket "$ADMIN" --output json | sed -E 's/.*"node_api_address":"([^"]+)".*/\1/')"
echo "node API on $ADDR"

step "Starting a node agent, attested with a one-time join token"
agentd bundle show --admin-socket "$ADMIN" >"$DEMO/bundle.pem"
TOKEN="$(agentd token generate --spiffe-id spiffe://example.org/node/demo --admin-socket "$ADMIN")"
"$BIN" node run --server-address "$ADDR" --join-token "$TOKEN" --trust-bundle "$DEMO/bundle.pem" \
    --data-dir "$DEMO/node" --socket-path "$SOCK" --sync-interval 1s >"$DEMO/node.log" 2>&1 &
PIDS+=($!)
NAMES+=("node agent")
echo "node agent pid: $!"
wait_for "the node agent" agentd healthcheck --socket-path "$SOCK"
agentd node list --admin-socket "$ADMIN"

step "Registering the current user (uid $(id -u)) as agent spiffe://example.org/agent/demo (X.509-SVID TTL 10s)"
ID="$(agentd entry create --admin-socket "$ADMIN" \
    --parent-id spiffe://example.org/node/demo \
    --spiffe-id spiffe://example.org/agent/demo \
    --selector "unix:uid:$(id -u)" \
    --scope calendar:read --owner "$(id -un)@example.com" \
    --x509-svid-ttl 10s)"
echo "entry id: $ID"

step "Fetching the SVID over the SPIFFE Workload API"
wait_for "the node agent to serve the new entry" agentd api fetch x509 --socket-path "$SOCK"
agentd api fetch x509 --socket-path "$SOCK" --write "$DEMO/svid"
openssl verify -CAfile "$DEMO/svid/bundle.0.pem" "$DEMO/svid/svid.0.pem" 2>/dev/null || true

step "A JWT-SVID for audience tools.example.org, validated by the node agent"
JWT="$(agentd api fetch jwt --audience tools.example.org --socket-path "$SOCK" --output json \
    | sed -E 's/.*"svid":"([^"]+)".*/\1/')"
echo "${JWT:0:60}..."
agentd api validate jwt --audience tools.example.org --svid "$JWT" --socket-path "$SOCK"

step "Waiting for rotation: the node agent renews the SVID at about half its 10s lifetime"
FIRST="$(cert_serial)"
echo "current serial: $FIRST"
ROTATED=""
for _ in $(seq 120); do
    NOW="$(cert_serial)"
    if [ "$NOW" != "$FIRST" ]; then ROTATED="$NOW"; break; fi
    sleep 0.1
done
if [ -n "$ROTATED" ]; then
    echo "rotated serial: $ROTATED"
else
    echo "error: no rotation seen within 12s" >&2
    exit 1
fi

step "Revoking the entry: pushed to the node agent, the workload loses its identity at once"
agentd revoke entry --admin-socket "$ADMIN" --id "$ID" --reason "demo"
echo "expected: no identity after revocation"
agentd api fetch x509 --socket-path "$SOCK" || true
agentd revoke list --admin-socket "$ADMIN"

step "Deleting the entry"
agentd entry delete --admin-socket "$ADMIN" --id "$ID"

step "Stopping the node agent and the server"
stop_daemons
rm -rf "$DEMO"
echo "done"
